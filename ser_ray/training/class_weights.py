"""Class weights for imbalanced corpora (no Ray, no torch).

A corpus such as MSP-Podcast trains on ~51k neutral clips against ~800 fearful ones and is
scored by macro-F1 and UA on a balanced test set: an unweighted loss then mostly learns the
large classes. ``balanced`` weights each class by ``n / (k * count_c)`` (scikit-learn's
``class_weight="balanced"``: the mean weight over the training clips is 1, so the loss keeps
its scale), ``none`` weights every clip alike, and ``auto`` (the default) is ``balanced``
only when the largest training class has more than :data:`AUTO_BALANCE_RATIO` times the clips
of the smallest: RAVDESS (neutral has half the clips of the other classes, a ratio of 2) stays
unweighted, as it was measured and published; an imbalanced corpus gets weights (the figures
that chose this are in docs/results.md, "Imbalanced classes").

>>> balanced_weights([30, 10, 0]).round(3).tolist()
[0.667, 2.0, 0.0]
>>> resolve_class_weight("auto", [8, 8, 4]), resolve_class_weight("auto", [40, 8, 2])
('none', 'balanced')
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The ``class_weight`` settings (``--class-weight``).
CLASS_WEIGHT_MODES = ("auto", "none", "balanced")
#: ``auto`` weights the classes when largest / smallest training class exceeds this.
AUTO_BALANCE_RATIO = 3.0


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Clips of the largest class over those of the smallest present one (1.0 when none)."""
    present = [int(c) for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0


def resolve_class_weight(mode: str, counts: Sequence[int]) -> str:
    """``none`` or ``balanced``: what ``mode`` means for training classes of ``counts``."""
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class_weight must be one of {CLASS_WEIGHT_MODES}, got {mode!r}")
    if mode == "auto":
        return "balanced" if imbalance_ratio(counts) > AUTO_BALANCE_RATIO else "none"
    return mode


def balanced_weights(counts: Sequence[int]) -> np.ndarray:
    """``n / (k * count_c)`` per class, ``k`` the classes with clips (a class without
    training clips gets 0: it adds no loss term anyway); the same values as scikit-learn's
    ``compute_class_weight("balanced", ...)`` over the present classes."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def class_weights(mode: str, counts: Sequence[int]) -> np.ndarray | None:
    """The loss's per-class weights for ``mode`` and the training ``counts`` (per class
    index), or None for an unweighted loss."""
    if resolve_class_weight(mode, counts) == "none":
        return None
    return balanced_weights(counts)
