"""The ``predictions.csv`` format, one builder for every model: one row per clip, the clip's
columns (path first), then one ``prob_<emotion>`` column per class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def predictions_frame(
    columns: Mapping[str, Any], probs: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """``columns`` (name -> one value per clip, or one value for all), in their order, then
    ``prob_<class>`` from ``probs`` (clips x classes, in ``class_names`` order).

    >>> predictions_frame({"path": ["a.wav"], "pred_label": ["sad"]}, np.array([[0.25, 0.75]]),
    ...                   ["happy", "sad"]).columns.tolist()
    ['path', 'pred_label', 'prob_happy', 'prob_sad']
    """
    frame = pd.DataFrame(dict(columns))
    for i, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, i]
    return frame


def argmax_labels(probs: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """The most probable class of every row of ``probs``."""
    return [class_names[i] for i in np.asarray(probs).argmax(axis=1)]
