"""Softmax probabilities from trained fold models, for new audio (no Ray).

Each wav2vec2-style fold model is a Hugging Face checkpoint folder written by the training
loop (``fold_<k>/model``): a standard ``AutoModelForAudioClassification`` model of any
supported family, run here through its own ``forward`` with its feature extractor, exactly as
``pipeline("audio-classification")`` does. Each SVM fold model is a ``fold_<k>.joblib`` of
:mod:`ser_ray.models.svm_model`. With several models the probabilities are averaged.
Speaker-normalised models (SVMs and SSL probes, ``+spknorm``) need the speaker of every clip
and at least two clips per speaker.

Clips are batched by :func:`ser_ray.models.ssl.inference_batches` under the rule the training
loop evaluates with (:func:`ser_ray.models.ssl.pads_exactly`): padded batches only where padding
changes nothing, else clips of one length together (wav2vec2-base style models: clip by
clip). The device is CUDA when present (with AMP, bf16 where supported), else CPU.

Fold models are read from where the run put them: a local folder or a URI (``s3://…``,
:mod:`ser_ray.common.storage`); a URI's ``*``, ``?`` and ``[…]``, which no shell expands, are
matched here (:func:`expand_locations`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel

from ser_ray.common import predictions, storage
from ser_ray.common.errors import MissingInputError
from ser_ray.models.ssl import load_model, model_probabilities

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def expand_locations(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """``patterns`` with each URI holding ``*``, ``?`` or ``[…]`` replaced by the locations it
    matches, in name order (``s3://b/run/svm_models/svm/fold_*.joblib``): the shell expands a
    local path's, never a URI's. Other patterns stay as given. Raises ``FileNotFoundError``
    when a URI pattern matches nothing, as a model that is not there would."""
    found = []
    for pattern in map(str, patterns):
        if not storage.is_uri(pattern) or not any(c in pattern for c in "*?["):
            found.append(pattern)
            continue
        matches = _matching(pattern)
        if not matches:
            raise FileNotFoundError(f"{pattern}: nothing matches")
        found += matches
    return found


def _matching(pattern: str) -> list[str]:
    """The locations a URI pattern matches, one level of names listed per wildcard part."""
    scheme, rest = pattern.split("://", 1)
    bucket, *parts = rest.split("/")
    locations = [f"{scheme}://{bucket}"]
    for part in filter(None, parts):
        if any(c in part for c in "*?["):
            locations = [
                storage.join(location, name)
                for location in locations
                for name in storage.list_names(location)
                if fnmatch.fnmatchcase(name, part)
            ]
        else:
            locations = [storage.join(location, part) for location in locations]
    return [location for location in locations if storage.exists(location)]


def load_fold_models(
    model_dirs: Sequence[str | os.PathLike], device: str | torch.device = "cpu"
) -> tuple[list[tuple[PreTrainedModel, object]], list[str]]:
    """The models (eval mode) and their shared class names; all must have the same classes.
    A folder may be a URI (``load_model`` copies it to this node first)."""
    if not model_dirs:
        raise ValueError("no model folders given")
    models, class_names = [], None
    for folder in model_dirs:
        if not storage.exists(storage.join(folder, "config.json")):
            raise MissingInputError(f"{folder}: not a saved model (no config.json)")
        model, fe = load_model(folder)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if class_names is None:
            class_names = names
        elif names != class_names:
            raise ValueError(f"{folder} predicts {names}, but the first model {class_names}")
        models.append((model.to(device).eval(), fe))
    return models, list(class_names)


def ensemble_probabilities(
    models: Sequence[tuple[PreTrainedModel, object]],
    waveforms: Sequence[np.ndarray],
    batch_size: int = 8,
    amp: str = "auto",
    speakers: Sequence[object] | None = None,
) -> np.ndarray:
    """Mean of the models' softmax probabilities (clips x classes); rows sum to 1.
    ``speakers`` (one per clip) for speaker-normalised probes."""
    probs = np.mean(
        [model_probabilities(m, fe, waveforms, batch_size, amp, speakers) for m, fe in models],
        axis=0,
    )
    return probs / probs.sum(axis=1, keepdims=True)


def predict_files(
    model_dirs: Sequence[str | os.PathLike],
    audio_files: Sequence[str],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    amp: str = "auto",
    speakers: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, rejected) for audio files of any supported format and sample rate.

    ``device``: None picks CUDA when present; ``amp``: the autocast mode on CUDA (auto, bf16,
    fp16, off); ``speakers`` maps each audio path to its speaker (needed, for every clip, by
    speaker-normalised probes).

    predictions: ``path, pred_label, n_models, prob_<class>...``; rejected: ``path, reason``.
    """
    models, class_names = load_fold_models(model_dirs, device or default_device())
    paths, waveforms, rejected = _load_clips(audio_files)
    by_clip = [speakers.get(p) for p in paths] if speakers is not None else None
    probs = (
        ensemble_probabilities(models, waveforms, batch_size, amp, by_clip)
        if waveforms
        else np.zeros((0, len(class_names)))
    )
    return _prediction_frame(paths, probs, class_names, len(models)), rejected


def predict_files_svm(
    model_files: Sequence[str | os.PathLike],
    audio_files: Sequence[str],
    speakers: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, rejected) of saved SVM fold models (files, local or URIs); ``speakers``
    maps each audio path to its speaker (needed, for every clip, by speaker-normalised
    models)."""
    from ser_ray.models import svm_model

    if not model_files:
        raise ValueError("no SVM model files given")
    fold_models = [svm_model.load_fold_model(f) for f in model_files]
    paths, waveforms, rejected = _load_clips(audio_files)
    clips = pd.DataFrame(
        [
            {"path": p, **svm_model.svm_feature_columns(w)}
            for p, w in zip(paths, waveforms, strict=True)
        ],
        columns=["path", "mfcc_stats", "egemaps"],
    )
    clips = svm_model.with_encoder_features(clips, waveforms, fold_models)  # svm+ssl's
    class_names = fold_models[0].class_names
    probs = (
        svm_model.predict_svm(fold_models, clips, speakers)
        if paths
        else np.zeros((0, len(class_names)))
    )
    return _prediction_frame(paths, probs, class_names, len(fold_models)), rejected


def _load_clips(audio_files: Sequence[str]) -> tuple[list[str], list[np.ndarray], pd.DataFrame]:
    """16 kHz mono waveforms of the readable files; the others as rejected (path, reason)."""
    from ser_ray.features.audio import AudioError, load_audio

    paths, waveforms, rejected = [], [], []
    for path in audio_files:
        try:
            wave = load_audio(str(path))
            if len(wave) < 400:
                raise AudioError(f"shorter than 25 ms ({len(wave)} samples at 16 kHz)")
        except AudioError as err:
            log.warning("skipping %s: %s", path, err)
            rejected.append({"path": str(path), "reason": str(err)})
            continue
        paths.append(str(path))
        waveforms.append(wave)
    return paths, waveforms, pd.DataFrame(rejected, columns=["path", "reason"])


def _prediction_frame(
    paths: list[str], probs: np.ndarray, class_names: Sequence[str], n_models: int
) -> pd.DataFrame:
    columns = {
        "path": paths,
        "pred_label": predictions.argmax_labels(probs, class_names),
        "n_models": n_models,
    }
    return predictions.predictions_frame(columns, probs, class_names)
