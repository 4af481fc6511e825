"""What the study's summary is made of and told: the variants' results
(:class:`StudyResults`), which speakers each variant's models trained on, the encoder's learning
rate schedule, and the run's facts (models, label map, settings' provenance), handed to
:func:`ser_ray.study.summary.write_summary`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from ser_ray.common import config_file, storage
from ser_ray.corpus.protocol import Protocol
from ser_ray.models.svm_approx import describe
from ser_ray.study.config import KFoldConfig
from ser_ray.study.encoders import encoder_of
from ser_ray.study.variants import Variant, parse_variants
from ser_ray.training.config import TrainConfig

#: Which speakers of an outer fold each variant's reported model trained on, by (SSL, refit).
TRAINED_ON = {
    (False, False): "every training speaker of the fold (settings chosen by inner CV over "
    "them, then refit on all of them)",
    (True, False): "the fit speakers only: the validation speakers (taken from the training "
    "side) choose the best epoch and are never trained on (--refit trains on all of them)",
    (True, True): "every training speaker (--refit: retrained on fit + validation speakers "
    "for the best epoch count found with the validation speakers held out)",
}


@dataclasses.dataclass
class StudyResults:
    """What the variants produced: per fold the summary row, the out-of-fold predictions, and
    per SSL variant its per-fold histories and fold configs as trained (encoders resolved)."""

    fold_rows: dict[int, dict[str, Any]]
    predictions: list[pd.DataFrame]
    histories: dict[str, dict[int, list[dict]]]
    train_cfgs: dict[str, dict[int, TrainConfig]]
    #: Per SVM variant, the solver its folds ran (``exact``/``approx``, chosen by size).
    svm_solvers: dict[str, str] = dataclasses.field(default_factory=dict)


def write_study_summary(
    cfg: KFoldConfig,
    protocol: Protocol,
    out: str,
    variants: tuple[Variant, ...],
    df: pd.DataFrame,
    results: StudyResults,
    provenance: dict[str, Any] | None,
    cross_corpus: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``OUT/predictions.csv`` and the summary files
    (:func:`ser_ray.study.summary.write_summary`; on a URI written here, then uploaded)."""
    from ser_ray.study import summary

    all_predictions = pd.concat(results.predictions, ignore_index=True)
    storage.write_text(storage.join(out, "predictions.csv"), all_predictions.to_csv(index=False))
    histories, train_cfgs = results.histories, results.train_cfgs
    ssl = [v for v in variants if v.is_ssl]
    with storage.staged(out) as local:
        return summary.write_summary(
            local,
            list(results.fold_rows.values()),
            all_predictions,
            list(protocol.classes),
            summary.RunInfo(
                models={
                    v.name: encoder_of(cfg, v)
                    + ("+tapt" if v.is_ssl and cfg.tapt_epochs else "")
                    + ("" if v.is_ssl else " (frozen; its pooled layers are the SVM's features)")
                    for v in variants
                    if v.uses_encoder
                },
                merge_calm=cfg.train.merge_calm,
                fold_scheme=protocol.scheme,
                label_map=_changed_label_map(protocol),
                config=config_file.to_jsonable(dataclasses.asdict(cfg)),
                params_provenance=provenance,
                trained_on=trained_on(cfg, protocol),
                variants={v.name: {**v.describe(), **_solver(cfg, results, v)} for v in variants},
                cross_corpus=cross_corpus,
            ),
            histories=histories,
            lr_schedules={  # the encoder's; a probe's stays frozen
                v.name: encoder_lr_schedule(
                    train_cfgs[v.name][min(histories[v.name])],
                    histories[v.name][min(histories[v.name])],
                )
                for v in ssl
                if not v.probe
            },
            expected_paths=tested_paths(protocol, df),
        )


def tested_paths(protocol: Protocol, df: pd.DataFrame) -> list[str]:
    """The clips some fold tests: every clip under k-fold folds, the test sets' clips only
    with a corpus's own partitions (its train and dev clips are never predicted)."""
    tested = {s for fold in protocol.folds for s in fold}
    return df.loc[df["actor"].isin(tested), "path"].tolist()


def _solver(cfg: KFoldConfig, results: StudyResults, variant: Variant) -> dict[str, str]:
    """An SVM variant's solver and what it is (for the summary); nothing for other variants
    or folds saved by a run that did not record it."""
    solver = results.svm_solvers.get(variant.name)
    if solver is None:
        return {}
    return {"solver": solver, "solver_description": describe(solver, cfg.svm_approx_components)}


def _changed_label_map(protocol: Protocol) -> dict[str, str | None] | None:
    """The protocol's label map if it changes any label (None when every label is its own
    class)."""
    changed = any(label != target for label, target in protocol.label_map.items())
    return dict(protocol.label_map) if changed else None


def trained_on(cfg: KFoldConfig, protocol: Protocol) -> dict[str, Any]:
    """Per variant: which speakers of each outer fold its reported model was trained on."""
    out: dict[str, Any] = {}
    for variant in parse_variants(cfg.variants):
        refit = variant.is_ssl and cfg.train.refit
        per_fold = {}
        for k in protocol.fold_numbers:
            _, fit, val = protocol.split(k)
            per_fold[str(k)] = sorted(fit + val) if not variant.is_ssl or refit else fit
        out[variant.name] = {
            "description": TRAINED_ON[variant.is_ssl, refit],
            "per_fold": per_fold,
        }
    return out


def encoder_lr_schedule(train_cfg: TrainConfig, history: list[dict]) -> list[tuple[int, float]]:
    """The encoder's learning rate at every optimizer step of a full run, as the loop's
    ``LambdaLR`` applies it (steps per epoch read from the fold's history)."""
    from ser_ray.training.schedule import lr_multiplier

    steps_per_epoch = int(history[0]["step"])
    total = steps_per_epoch * train_cfg.epochs
    return [
        (
            step,
            train_cfg.lr_encoder
            * lr_multiplier(
                step,
                total,
                train_cfg.warmup_frac,
                train_cfg.decay_start_frac,
                train_cfg.final_lr_scale,
                train_cfg.decay_shape,
            ),
        )
        for step in range(total)
    ]
