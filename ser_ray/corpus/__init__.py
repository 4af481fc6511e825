"""Clip tables of a corpus: RAVDESS names, folds, the demo corpus."""
