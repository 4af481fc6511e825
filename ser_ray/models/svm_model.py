"""Saved SVM fold models and their predictions for new audio (no Ray).

A fold model is the calibrated SVM pipeline that scored one outer fold, stored with what it
needs to score new clips the same way: its variant name, feature set, whether its features
were speaker-normalised, the class names, and for ``svm+ssl`` the frozen encoder whose pooled
layers it takes. New clips get the features of :mod:`ser_ray.features.audio` (MFCC statistics,
eGeMAPS) with the default :class:`FeatureConfig`, or that encoder's pooled layers
(:func:`with_encoder_features`); a model trained on other feature options is refused by its
feature count.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import joblib
import numpy as np
import pandas as pd

from ser_ray.common import storage
from ser_ray.features import audio
from ser_ray.features.featurize import FeatureConfig
from ser_ray.models import svm

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FoldModel:
    model: Any  # fitted sklearn CalibratedClassifierCV
    variant: str  # e.g. "svm+egemaps+spknorm"
    feature_set: str  # key of ser_ray.models.svm.FEATURE_SETS
    speaker_norm: bool  # features z-normalised per speaker before the model
    class_names: list[str]
    fold: int
    params: dict[str, Any]
    encoder: str | None = None  # svm+ssl: the frozen encoder (folder or hub id) of its features


def save_fold_model(location: str | os.PathLike, fold_model: FoldModel) -> str:
    """Write ``fold_model`` to the file ``location``, local or a URI (the run location, which
    predict and the cross-corpus test read from any node); returns ``location``."""
    buffer = io.BytesIO()
    joblib.dump(dataclasses.asdict(fold_model), buffer)
    return storage.write_bytes(location, buffer.getvalue())


def load_fold_model(location: str | os.PathLike) -> FoldModel:
    """The fold model saved at ``location`` (local or a URI) by :func:`save_fold_model`."""
    return FoldModel(**joblib.load(io.BytesIO(storage.read_bytes(location))))


def svm_feature_columns(y: np.ndarray) -> dict[str, np.ndarray]:
    """The SVM's feature columns of one 16 kHz clip, as :mod:`ser_ray.features.featurize` stores
    them with the default :class:`FeatureConfig`."""
    config = FeatureConfig()
    return {
        "mfcc_stats": audio.mfcc_stats(y, config.target_sr_hz, config.mfcc)["mfcc_stats"],
        "egemaps": audio.egemaps_functionals(y, config.target_sr_hz),
    }


def with_encoder_features(
    clips: pd.DataFrame, waveforms: Sequence[np.ndarray], fold_models: Sequence[FoldModel]
) -> pd.DataFrame:
    """``clips`` (one row per waveform) with the pooled layers of the fold models' encoder
    (:data:`ser_ray.models.svm.SSL_COLUMN`) when they take them; unchanged otherwise."""
    encoders = sorted({m.encoder or "" for m in fold_models if m.feature_set == "ssl"})
    if not encoders:
        return clips
    if len(encoders) > 1 or not encoders[0]:
        raise ValueError(
            f"the svm+ssl fold models name the encoders {encoders}: give the models of one run"
        )
    from ser_ray.models.ssl import pooled_layer_features

    try:
        column = pooled_layer_features(encoders[0], waveforms)
    except OSError as err:
        raise ValueError(
            f"the svm+ssl fold models take the pooled layers of {encoders[0]}, which cannot be "
            f"loaded ({err}); put that encoder back (a demo encoder: run the study again)"
        ) from err
    return clips.assign(**{svm.SSL_COLUMN: column})


def predict_svm(
    fold_models: Sequence[FoldModel],
    clips: pd.DataFrame,
    speakers: Mapping[str, str] | None,
) -> np.ndarray:
    """Mean class probabilities of ``fold_models`` for ``clips`` (``path`` and the columns of
    their feature set: ``mfcc_stats``, ``egemaps``, ``ssl_layers``); ``speakers`` maps path
    -> speaker (needed by speaker-normalised models).

    Raises :class:`ser_ray.features.speaker_norm.SpeakerNormError` when a speaker-normalised model
    gets a clip without a speaker or a speaker with a single clip.
    """
    first = fold_models[0]
    if any(m.class_names != first.class_names for m in fold_models):
        raise ValueError("the SVM fold models predict different classes; give models of one run")
    frame = clips.assign(actor=[(speakers or {}).get(p) for p in clips["path"]])
    probs = []
    for m in fold_models:
        X = svm.feature_set_matrix(frame, m.feature_set, m.speaker_norm)
        expected = m.model.n_features_in_
        if X.shape[1] != expected:
            raise ValueError(
                f"{m.variant} fold {m.fold} expects {expected} features, new clips give "
                f"{X.shape[1]}: it was trained on features prepared with other options"
            )
        probs.append(svm.class_probabilities(m.model, X, len(m.class_names)))
    mean = np.mean(probs, axis=0)
    return mean / mean.sum(axis=1, keepdims=True)
