"""The main study: features -> SVM variants' nested CV -> each SSL variant (wav2vec2,
WavLM, ... fine-tuned or probed) on the folds concurrently -> one summary with the named
variants side by side (:mod:`ser_ray.study.variants`).

Read :func:`run_kfold` top to bottom: every step is a function below it. The study's settings
are :mod:`ser_ray.study.config`, a ``--params`` file is :mod:`ser_ray.study.params`, and each
outer fold of an SSL variant is one Ray Tune trial (:mod:`ser_ray.distributed.ssl_folds`).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pandas as pd

from ser_ray.common import config_file, storage
from ser_ray.common.errors import SettingsError
from ser_ray.corpus.clips import ClipTable, is_unknown_speaker
from ser_ray.corpus.demo_corpus import demo_source
from ser_ray.corpus.protocol import (
    PARTITIONS,
    Protocol,
    check_protocol,
    resolve_protocol,
    speakers_of,
)
from ser_ray.distributed import cluster
from ser_ray.distributed.prepare import CorpusInputs, prepare_features, read_corpus_inputs
from ser_ray.distributed.published import published_corpus
from ser_ray.distributed.resources import FoldPlan, asked_resources, plan_folds
from ser_ray.distributed.ssl_folds import run_ssl_folds
from ser_ray.features.featurize import FeatureConfig, load_features
from ser_ray.features.speaker_norm import SIDE_COLUMNS, SpeakerNormError, normalisation_groups
from ser_ray.study.config import KFoldConfig
from ser_ray.study.cross_corpus import CrossCorpusSettings, evaluate_cross_corpus, read_test_corpora
from ser_ray.study.encoders import check_model_reachable, encoder_of, with_encoders
from ser_ray.study.params import (
    TunedParams,
    read_params,
    train_config_for,
    warn_study_fields_in_params,
)
from ser_ray.study.report import StudyResults, write_study_summary
from ser_ray.study.svm_runs import svm_results
from ser_ray.study.variants import Variant, parse_variants, svm_parquet_columns
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

#: Schemes whose folds follow the manifest's split, fold or session values, the sides that
#: speaker normalisation pools unknown-speaker clips by.
SIDE_SCHEMES = (PARTITIONS, "predefined", "session")


def run_kfold(cfg: KFoldConfig, params: TunedParams | None = None) -> dict[str, Any]:
    """Run the study into ``cfg.out`` and return the summary (Ray must be initialised).

    The steps, in order: resolve the settings, read the corpus and resolve its protocol
    (``protocol.json``), check the encoders can be loaded, plan the SSL folds' resources,
    save it all (``config.json``), prepare the features, run every variant over the folds,
    write the summary. ``params``: ``cfg.params`` as :func:`~ser_ray.study.params.read_params`
    loaded it (the job loads it before Ray starts, to refuse a leaky file at once); loaded
    here when not given."""
    out = storage.absolute(cfg.out)
    storage.make_dirs(out)
    try:
        return _run_study(cfg, out, params)
    finally:
        cluster.release_requested_resources()


def _run_study(cfg: KFoldConfig, out: str, params: TunedParams | None) -> dict[str, Any]:
    ray_storage = _storage_path(cfg, out)
    params = params or read_params(cfg)  # refuses leaky settings before anything runs
    provenance = params.provenance if params else None
    warn_study_fields_in_params(cfg, params)
    variants = parse_variants(cfg.variants)
    for variant in variants:  # before minutes of features and SVMs
        if variant.uses_encoder:
            family = variant.family if variant.is_ssl else None  # an SVM takes any family's
            check_model_reachable(encoder_of(cfg, variant), family)
    features = _feature_config(variants)
    source = cfg.source or published_corpus(demo_source(cfg.smoke_test), out)
    inputs = read_corpus_inputs(source, features, cfg.speaker_regex, cfg.unknown_speaker)
    _check_every_node_reaches(out, source, inputs)  # before anything is written
    protocol = _resolved_protocol(cfg, params, inputs, out)
    _check_speaker_norm(variants, inputs.corpus, protocol)
    cross = _cross_corpus_settings(cfg, features)
    test_corpora = read_test_corpora(cross, protocol, inputs.corpus) if cross.sources else []
    train_cfgs = {
        v.name: {k: train_config_for(cfg, k, v, params) for k in protocol.fold_numbers}
        for v in _ssl_variants(variants)
    }
    plan = None
    if train_cfgs:
        _wait_for_asked_resources(cfg, len(protocol.folds))
        plan = plan_folds(cfg, len(protocol.folds))
        print(plan.line(), flush=True)
    _save_run_config(out, cfg, variants, train_cfgs, provenance, ray_storage, plan)
    features_dir, df = _prepared_features(source, out, variants, inputs, features, protocol)
    results = _run_variants(cfg, protocol, variants, df, features_dir, train_cfgs, out, ray_storage)
    tested = evaluate_cross_corpus(test_corpora, cross, protocol, variants, out)
    return write_study_summary(cfg, protocol, out, variants, df, results, provenance, tested)


def _check_every_node_reaches(out: str, source: str, inputs: CorpusInputs) -> None:
    """On a cluster of several nodes: the run location readable and writable, and the corpus
    and its first clip readable, from every node (checked by a task on each), or one line
    naming the nodes that cannot and the fix
    (:class:`ser_ray.distributed.cluster.RunLocationError`)."""
    readable = {"the corpus": source}
    if len(inputs.corpus.frame):
        readable["its first clip"] = str(inputs.corpus.frame["path"].iloc[0])
    cluster.check_reachable(writable={"--out": out}, readable=readable)


def _wait_for_asked_resources(cfg: KFoldConfig, n_folds: int) -> None:
    """When ``--concurrent-folds``/``--gpus-per-fold`` ask for more than a joined cluster has
    now, ask its autoscaler and wait up to ``--cluster-wait-s`` for the nodes (a local
    instance cannot grow: the plan refuses at once)."""
    cpus, gpus = asked_resources(cfg, n_folds)
    if (cpus or gpus) and cluster.joined_existing_cluster():
        reason = f"{cfg.concurrent_folds or n_folds} folds at once"
        cluster.wait_for_resources(cpus, gpus, timeout_s=cfg.cluster_wait_s, reason=reason)


def _cross_corpus_settings(cfg: KFoldConfig, features: FeatureConfig) -> CrossCorpusSettings:
    return CrossCorpusSettings(
        sources=(*cfg.test_data_dir, *cfg.test_manifest),
        label_map=cfg.protocol.label_map,
        merge_calm=cfg.train.merge_calm,
        speaker_regex=cfg.speaker_regex,
        features=features,
    )


def _feature_config(variants: tuple[Variant, ...]) -> FeatureConfig:
    """What the features hold: eGeMAPS (openSMILE, ~5x the MFCC recipe's time) only when a
    variant uses them."""
    return FeatureConfig(egemaps="egemaps" in svm_parquet_columns(variants))


def _resolved_protocol(
    cfg: KFoldConfig, params: TunedParams | None, inputs: CorpusInputs, out: str
) -> Protocol:
    """The protocol of the corpus (``--protocol`` file or resolved from the clips), saved as
    ``OUT/protocol.json``; every stage gets this one object."""
    folds = params.folds() if params else [None]
    n_val = {train_config_for(cfg, k, params=params).n_val_speakers for k in folds}
    if len(n_val) != 1:
        raise SettingsError(
            f"{cfg.params}: the folds' settings ask for different numbers of validation "
            f"speakers {sorted(n_val)}; one protocol needs one number"
        )
    protocol = resolve_protocol(inputs.corpus, cfg.protocol_settings(n_val.pop()))
    protocol.save(storage.join(out, "protocol.json"))
    return protocol


def _check_speaker_norm(
    variants: tuple[Variant, ...], corpus: ClipTable, protocol: Protocol
) -> None:
    """Speaker-normalised variants need two clips of every speaker at least, and of the
    unknown-speaker clips of every side (pooled: :func:`ser_ray.features.speaker_norm.
    normalisation_groups`), sides the protocol's folds follow: refused here, before any
    work, naming the speakers (a single clip has no spread to scale by)."""
    if not any(v.speaker_norm for v in variants):
        return
    kept = corpus.frame[corpus.frame["emotion"].isin(protocol.kept_labels)]
    unknown = int(kept["speaker"].map(is_unknown_speaker).sum())
    if unknown and protocol.scheme not in SIDE_SCHEMES:
        raise SpeakerNormError(
            f"{unknown} clips have an unknown speaker: speaker-normalised variants pool them "
            f"by their split, fold or session, which {protocol.scheme} folds do not follow; "
            "use --folds predefined or session, or run without +spknorm variants"
        )
    groups = pd.Series(normalisation_groups(kept.assign(actor=kept["speaker"])))
    counts = groups.value_counts()
    single = sorted(map(str, counts[counts < 2].index))
    if single:
        raise SpeakerNormError(
            f"speakers {single[:10]} have a single clip: speaker normalisation cannot estimate "
            "their statistics; give more clips of them, or run without +spknorm variants"
        )


def _storage_path(cfg: KFoldConfig, out: str) -> str:
    """Where Tune and Train keep their state: ``OUT/ray``, in the run location, or the
    deprecated ``--storage-path``."""
    if cfg.storage_path is None:
        return storage.join(out, "ray")
    log.warning(
        "--storage-path is deprecated: Tune/Train state belongs in the run location (OUT/ray); "
        "put --out on a folder every node mounts or on a URI instead"
    )
    return storage.absolute(cfg.storage_path)


def _ssl_variants(variants: tuple[Variant, ...]) -> list[Variant]:
    return [v for v in variants if v.is_ssl]


def _save_run_config(
    out: str,
    cfg: KFoldConfig,
    variants: tuple[Variant, ...],
    train_cfgs: dict[str, dict[int, TrainConfig]],
    provenance: dict[str, Any] | None,
    storage: str,
    plan: FoldPlan | None,
) -> None:
    """``OUT/config.json``: the study's settings, resolved (per SSL variant its training
    settings: one set, or per fold with a ``--params`` file), and the resource plan of the
    SSL folds, before anything runs."""
    config_file.save_config(
        out,
        {
            "job": "kfold",
            "kfold": cfg,
            "variants": {v.name: v.describe() for v in variants},
            "train": {
                name: per_fold[min(per_fold)] if cfg.params is None else per_fold
                for name, per_fold in train_cfgs.items()
            },
            "params_provenance": provenance,
            "storage_path": storage,
            "resource_plan": plan,
            "ser_ray_version": _version(),
        },
    )


def _prepared_features(
    source: str,
    out: str,
    variants: tuple[Variant, ...],
    inputs: CorpusInputs,
    features: FeatureConfig,
    protocol: Protocol,
) -> tuple[str, pd.DataFrame]:
    """Features of the corpus in ``OUT/prepared``; ``OUT/rejected.csv`` lists its unusable
    files and the clips the label map drops. Returns the features folder and the columns the
    SVM variants need of the clips that take part, checked against the protocol."""
    prepared = prepare_features(source, storage.join(out, "prepared"), features, inputs=inputs)
    norm = ["speaker", *SIDE_COLUMNS] if any(v.speaker_norm for v in variants) else []
    columns = ["path", "actor", "emotion", *norm, *sorted(svm_parquet_columns(variants))]
    df = load_features(prepared.features_dir, columns)
    dropped = df["emotion"].isin(protocol.dropped_labels)
    rejected = pd.read_csv(io.BytesIO(storage.read_bytes(prepared.rejected_csv)))
    reasons = "label " + df.loc[dropped, "emotion"] + " left out by the label map"
    extra = pd.DataFrame({"path": df.loc[dropped, "path"], "reason": reasons})
    listed = pd.concat([rejected, extra], ignore_index=True)
    storage.write_text(storage.join(out, "rejected.csv"), listed.to_csv(index=False))
    df = df[~dropped].reset_index(drop=True)
    check_protocol(protocol, df)
    return prepared.features_dir, df


def _run_variants(
    cfg: KFoldConfig,
    protocol: Protocol,
    variants: tuple[Variant, ...],
    df: pd.DataFrame,
    features_dir: str,
    train_cfgs: dict[str, dict[int, TrainConfig]],
    out: str,
    ray_storage: str,
) -> StudyResults:
    """Every variant over the same folds, in order: an SVM's nested CV, an SSL variant's
    folds."""
    results = StudyResults(
        fold_rows={k: _fold_row(protocol, k, df) for k in protocol.fold_numbers},
        predictions=[],
        histories={},
        train_cfgs=dict(train_cfgs),
    )
    for variant in variants:
        if not variant.is_ssl:
            svm_folds, svm_predictions = svm_results(df, cfg, protocol, out, variant, features_dir)
            for row in svm_folds:
                keys = (variant.name, f"{variant.name}_params", f"{variant.name}_search_s")
                results.fold_rows[row["fold"]].update({key: row.get(key) for key in keys})
                if f"{variant.name}_solver" in row:  # absent from folds saved before solvers
                    results.svm_solvers[variant.name] = row[f"{variant.name}_solver"]
            results.predictions.append(svm_predictions)
            continue
        fold_cfgs = with_encoders(train_cfgs[variant.name], features_dir, cfg, protocol, out)
        results.train_cfgs[variant.name] = fold_cfgs
        outcomes = run_ssl_folds(
            variant.name, features_dir, cfg, protocol, fold_cfgs, out, ray_storage,
            speaker_norm=variant.speaker_norm,
        )  # fmt: skip
        results.histories[variant.name] = {}
        for outcome in outcomes:
            m = outcome.metrics
            results.fold_rows[outcome.fold][variant.name] = {
                "accuracy": m["test/accuracy"],
                "uar": m["test/uar"],
                "macro_f1": m["test/macro_f1"],
                "best_epoch": int(m["best_epoch"]),
            }
            results.histories[variant.name][outcome.fold] = outcome.history
            results.predictions.append(outcome.predictions)
    return results


def _fold_row(protocol: Protocol, fold: int, df: pd.DataFrame) -> dict[str, Any]:
    """A fold's summary row before any variant ran: its test speakers (numbers; names too
    where they are not the numbers themselves) and clips, and the clips per class of its
    training side (every other speaker: what the SVMs train on, and the SSL folds' fit and
    validation speakers), which show how imbalanced the training classes are."""
    speakers = list(protocol.folds[fold - 1])
    row = {"fold": fold, "test_actors": speakers, "n_test": int(df["actor"].isin(speakers).sum())}
    train_classes = df.loc[~df["actor"].isin(speakers), "emotion"].map(protocol.label_index())
    row["train_class_counts"] = {
        name: int((train_classes == i).sum()) for i, name in enumerate(protocol.classes)
    }
    names = speakers_of(protocol, speakers)
    if names != [str(a) for a in speakers]:
        row["test_speakers"] = names
    if protocol.fold_names:
        row["name"] = protocol.fold_names[fold - 1]
    return row


def _version() -> str:
    from importlib.metadata import version

    return version("ser_ray")
