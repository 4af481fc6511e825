"""Pieces every layer uses: metrics (UA, WA, macro-F1)."""
