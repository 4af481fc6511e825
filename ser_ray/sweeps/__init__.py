"""Hyperparameter searches on Ray Tune: the SVM and AdamW sweeps."""
