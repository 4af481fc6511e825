"""Classification metrics shared by every model (pure numpy).

UA (unweighted average recall, ``uar``) is the headline figure for RAVDESS, where neutral
has half as many clips as the other emotions; accuracy (weighted accuracy, WA) and macro-F1
sit beside it.

>>> m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], num_classes=2)
>>> m["accuracy"], m["uar"]
(0.75, 0.75)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as an int64 array of shape (num_classes, num_classes)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for classes absent from ``y_true``."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int
) -> dict[str, float]:
    """Accuracy, UA (mean recall over classes present in ``y_true``) and macro-F1.

    Macro-F1 averages over the classes present in ``y_true`` or ``y_pred`` (as scikit-learn
    does over its inferred labels).
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    total = cm.sum()
    if total == 0:
        raise ValueError("no labels to score")
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / total),
        "uar": float(np.nanmean(per_class_recall(cm))),
        "macro_f1": float(f1[present].mean()),
    }
