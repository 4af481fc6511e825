"""The k-fold study: driver, variants, summary tables and plots."""
