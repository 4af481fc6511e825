"""Cross-corpus evaluation: the study's fold models tested on other corpora, over the classes
the two corpora share (driver side, after the study's folds).

Every fold model of every variant (trained on its fold's training speakers of the study
corpus, as reported in the study's table) scores every clip of each test corpus; the
figures are per fold model, then mean ± std over them, like the study's own. A test corpus's
labels go through the study's label map (``--label-map`` applies to both corpora); clips whose
class the study does not have are left out and counted. Predictions are made over the shared
classes only (the argmax of the model's probabilities restricted to them), so that a model is
never marked wrong for a class the test corpus cannot hold. A test corpus may share no audio
file with the study corpus (refused); different corpora have different speakers, so no test
speaker was ever trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ser_ray.common import predictions, storage
from ser_ray.common.metrics import classification_metrics
from ser_ray.corpus.clips import ClipTable
from ser_ray.corpus.protocol import Protocol, parse_label_map
from ser_ray.distributed.prepare import CorpusInputs, prepare_features, read_corpus_inputs
from ser_ray.features.featurize import FeatureConfig, load_features
from ser_ray.models import svm_model
from ser_ray.models.ssl import load_model, model_probabilities
from ser_ray.study.summary import fold_mean_std
from ser_ray.study.variants import Variant, svm_parquet_columns
from ser_ray.training.checkpoints import BEST_MODEL_DIR

log = logging.getLogger(__name__)

WHAT_RAN = (
    "each fold model of each variant (trained on its fold's training speakers of the study "
    "corpus) tested on every clip of the test corpus whose class the study has; predictions "
    "over the shared classes only; mean ± std over the fold models"
)


@dataclasses.dataclass(frozen=True)
class CrossCorpusSettings:
    """What the study needs to test its models on other corpora."""

    sources: tuple[str, ...]  # folders or manifests of the test corpora
    label_map: str | None  # the study's --label-map, applied to the test corpora too
    merge_calm: bool
    speaker_regex: str | None
    features: FeatureConfig  # as the study's (same MFCC, eGeMAPS if a variant uses them)


@dataclasses.dataclass
class HeldOutCorpus:
    """A test corpus, read and checked before the study runs."""

    name: str  # its folder under out/cross_corpus
    source: str
    inputs: CorpusInputs


def read_test_corpora(
    settings: CrossCorpusSettings, protocol: Protocol, study: ClipTable
) -> list[HeldOutCorpus]:
    """Each test corpus's clips, checked before any heavy work: no audio file of the study
    corpus, and at least two classes shared with the study."""
    corpora = []
    for name, source in _named(settings.sources):
        inputs = read_corpus_inputs(source, settings.features, settings.speaker_regex)
        shared_files = sorted(set(inputs.corpus.frame["path"]) & set(study.frame["path"]))
        if shared_files:
            raise ValueError(
                f"test corpus {source} holds {len(shared_files)} files of the study corpus "
                f"(first: {shared_files[0]}); a cross-corpus test needs another corpus"
            )
        labels = sorted(set(inputs.corpus.frame["emotion"]))
        classes = {_class_of(label, settings, protocol) for label in labels}
        if len(classes & set(protocol.classes)) < 2:
            raise ValueError(
                f"test corpus {source} shares fewer than two classes with the study "
                f"{list(protocol.classes)} (its labels: {labels}); map them with --label-map"
            )
        corpora.append(HeldOutCorpus(name, source, inputs))
    return corpora


def evaluate_cross_corpus(
    corpora: Sequence[HeldOutCorpus],
    settings: CrossCorpusSettings,
    protocol: Protocol,
    variants: Sequence[Variant],
    out: str | os.PathLike,
) -> list[dict[str, Any]]:
    """Test the fold models in the run location ``out`` (a local folder or a URI;
    ``svm_models/<variant>/``, ``<SSL variant>/fold_<k>/``) on each test corpus; one result per
    corpus (for the summary) and ``out/cross_corpus/<name>/predictions.csv``."""
    results = []
    for corpus in corpora:
        folder = storage.join(out, "cross_corpus", corpus.name)
        clips, left_out = _test_clips(corpus, folder, settings, protocol, variants)
        shared = [c for c in protocol.classes if c in set(clips["class"])]
        per_fold: dict[str, list[dict[str, Any]]] = {}
        frames = []
        for variant in variants:
            variant_clips = _with_encoder_features(variant, clips, out, protocol.fold_numbers[0])
            for k in protocol.fold_numbers:
                probs = _fold_probabilities(variant, k, variant_clips, out)
                metrics, frame = _scored(probs, clips, protocol.classes, shared)
                per_fold.setdefault(variant.name, []).append({"fold": k, **metrics})
                frames.append(frame.assign(fold=k, model=variant.name))
        table = pd.concat(frames, ignore_index=True).to_csv(index=False)
        storage.write_text(storage.join(folder, "predictions.csv"), table)
        results.append(_result(corpus, clips, shared, left_out, per_fold, variants))
        log.info("cross-corpus %s: %d clips, classes %s", corpus.name, len(clips), shared)
    return results


def _class_of(label: str, settings: CrossCorpusSettings, protocol: Protocol) -> str | None:
    """A test corpus label's class: the study's label map where it names the label, else the
    ``--label-map`` given, else the label itself."""
    if label in protocol.label_map:
        return protocol.label_map[label]
    return parse_label_map(settings.label_map, settings.merge_calm).get(label, label)


def _named(sources: Sequence[str]) -> list[tuple[str, str]]:
    """(a folder name for each test corpus, its source): the file or folder name, numbered
    when two are the same."""
    named, seen = [], {}
    for source in sources:
        stem = Path(source.rstrip("/")).stem or "corpus"
        seen[stem] = seen.get(stem, 0) + 1
        named.append((stem if seen[stem] == 1 else f"{stem}_{seen[stem]}", source))
    return named


def _test_clips(
    corpus: HeldOutCorpus,
    folder: str,
    settings: CrossCorpusSettings,
    protocol: Protocol,
    variants: Sequence[Variant],
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The test corpus's features (prepared into ``folder/prepared``) of the clips whose class
    the study has, a ``class`` column added; and the clips left out per label."""
    prepared = prepare_features(
        corpus.source, storage.join(folder, "prepared"), settings.features, inputs=corpus.inputs
    )
    columns = ["path", "actor", "speaker", "emotion", *_columns(variants)]
    clips = load_features(prepared.features_dir, columns)
    clips["class"] = [_class_of(e, settings, protocol) for e in clips["emotion"]]
    kept = clips["class"].isin(protocol.classes)
    left_out = clips.loc[~kept, "emotion"].value_counts().sort_index().to_dict()
    return clips[kept].reset_index(drop=True), {str(k): int(v) for k, v in left_out.items()}


def _columns(variants: Sequence[Variant]) -> list[str]:
    """The feature columns the variants' models read."""
    columns = svm_parquet_columns(variants)
    if any(v.uses_encoder for v in variants):
        columns.add("waveform")
    return sorted(columns)


def _svm_model_file(out: str | os.PathLike, variant: Variant, fold: int) -> str:
    return storage.join(out, "svm_models", variant.name, f"fold_{fold}.joblib")


def _with_encoder_features(
    variant: Variant, clips: pd.DataFrame, out: str | os.PathLike, fold: int
) -> pd.DataFrame:
    """The clips with the pooled layers ``svm+ssl`` takes (all its fold models name the one
    encoder of the study; ``fold``'s says which); unchanged for other variants."""
    if variant.feature_set != "ssl":
        return clips
    model = svm_model.load_fold_model(_svm_model_file(out, variant, fold))
    return svm_model.with_encoder_features(clips, list(clips["waveform"]), [model])


def _fold_probabilities(
    variant: Variant, fold: int, clips: pd.DataFrame, out: str | os.PathLike
) -> np.ndarray:
    """Fold ``fold``'s model of ``variant`` on the clips: probabilities over the study's
    classes (speaker-normalised SVMs normalise each test speaker over its own clips). Models
    are read from the run location ``out``, local or a URI (``load_model`` copies a URI's
    model folder to this node first)."""
    if not variant.is_ssl:
        model = svm_model.load_fold_model(_svm_model_file(out, variant, fold))
        speakers = dict(zip(clips["path"], clips["actor"], strict=True))
        return svm_model.predict_svm([model], clips, speakers)
    model, fe = load_model(storage.join(out, variant.name, f"fold_{fold}", BEST_MODEL_DIR))
    speakers = clips["speaker"].tolist()  # a +probe+spknorm model normalises over each's clips
    return model_probabilities(model.eval(), fe, list(clips["waveform"]), speakers=speakers)


def _scored(
    probs: np.ndarray, clips: pd.DataFrame, classes: Sequence[str], shared: list[str]
) -> tuple[dict[str, float], pd.DataFrame]:
    """UA, accuracy and macro-F1 over the shared classes (argmax of the probabilities of those
    classes, renormalised), and the per-clip predictions frame."""
    columns = [list(classes).index(c) for c in shared]
    restricted = probs[:, columns]
    restricted = restricted / np.clip(restricted.sum(axis=1, keepdims=True), 1e-300, None)
    y_true = np.array([shared.index(c) for c in clips["class"]])
    y_pred = restricted.argmax(axis=1)
    metrics = classification_metrics(y_true, y_pred, len(shared))
    frame = predictions.predictions_frame(
        {
            "path": clips["path"].tolist(),
            "speaker": clips["speaker"].tolist(),
            "true_label": clips["class"].tolist(),
            "pred_label": [shared[i] for i in y_pred],
        },
        restricted,
        shared,
    )
    return metrics, frame


def _result(
    corpus: HeldOutCorpus,
    clips: pd.DataFrame,
    shared: list[str],
    left_out: dict[str, int],
    per_fold: dict[str, list[dict[str, Any]]],
    variants: Sequence[Variant],
) -> dict[str, Any]:
    """One test corpus's entry of ``summary.json``'s ``cross_corpus``."""
    rows = [
        {"fold": k, **{v: per_fold[v][i] for v in per_fold}}
        for i, k in enumerate(r["fold"] for r in next(iter(per_fold.values())))
    ]
    mean, std = fold_mean_std(rows)
    return {
        "test_corpus": corpus.name,
        "source": corpus.source,
        "what_ran": WHAT_RAN,
        "classes": shared,
        "n_clips": len(clips),
        "n_speakers": int(clips["speaker"].nunique()),
        "left_out_labels": left_out,
        "per_fold": per_fold,
        "mean": {v.name: mean[v.name] for v in variants},
        "std": {v.name: std[v.name] for v in variants},
    }
