"""SSL audio classifiers (standard HF classes), the SVM, the demo encoder."""
