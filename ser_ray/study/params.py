"""A ``--params`` file (tuned AdamW settings, ``jobs/tune_adamw.py``'s ``best.json``) and the
SSL training settings of every fold it leads to: defaults < the file < the study's own flags.

Apart from the driver so that what a file may hold, and when it is refused (settings tuned on
one fold's actors used for all folds), is read in one place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ser_ray.study.config import PROBE_DEFAULTS, STUDY_FIELDS, KFoldConfig, study_train_config
from ser_ray.study.variants import Variant
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)


def _read_params(cfg: KFoldConfig) -> dict[str, Any] | None:
    return json.loads(Path(cfg.params).read_text()) if cfg.params else None


def warn_study_fields_in_params(cfg: KFoldConfig) -> list[str]:
    """Warn (once, before anything runs) about :data:`STUDY_FIELDS` a ``--params`` file sets to
    other values than the study's: its flags decide those (:func:`train_config_for`), so the
    file's values are not used. Returns the fields warned about."""
    best = _read_params(cfg)
    if best is None:
        return []
    sets = (
        [v.get("params", v) for v in best["per_fold"].values()]
        if "per_fold" in best
        else [best.get("params", best)]
    )
    study = cfg.train.to_dict()
    ignored = sorted(
        {k for params in sets for k, v in params.items() if k in STUDY_FIELDS and study[k] != v}
    )
    for name in ignored:
        log.warning(
            "%s sets %s, one of the study's own settings, which its flags decide (%s=%r here): "
            "the file's value is not used; give --%s instead",
            cfg.params, name, name, study[name], name.replace("_", "-"),
        )  # fmt: skip
    return ignored


def _is_sweep_result(best: dict[str, Any]) -> bool:
    """A one-set-for-all-folds file written by a sweep (not settings chosen by hand)."""
    return "per_fold" not in best and bool({"fold", "search", "val_uar"} & set(best))


def params_provenance(cfg: KFoldConfig) -> dict[str, Any] | None:
    """Where the ``--params`` settings come from: file, nested or not, the actors they were
    tuned on per outer fold, and whether some folds' test actors helped choose them.

    Raises ``ValueError`` for a single-fold sweep's settings unless ``allow_leaky_params``.
    """
    best = _read_params(cfg)
    if best is None:
        return None
    out: dict[str, Any] = {"file": str(Path(cfg.params).resolve())}
    if "per_fold" in best:
        tuned = {k: v.get("search", {}) for k, v in best["per_fold"].items()}
        return {
            **out,
            "nested": True,
            "leaky": False,
            "tuned_on": {
                k: {"fit_actors": s.get("fit_actors"), "val_actors": s.get("val_actors")}
                for k, s in sorted(tuned.items(), key=lambda kv: int(kv[0]))
            },
            "note": "per outer fold: settings tuned on that fold's training actors only",
        }
    if not _is_sweep_result(best):
        return {
            **out,
            "nested": False,
            "leaky": False,
            "note": "settings given by hand (no sweep result): the same for every fold",
        }
    search = best.get("search", {})
    fold = best.get("fold", search.get("fold"))
    if not cfg.allow_leaky_params:
        raise ValueError(
            f"{cfg.params} holds AdamW settings tuned on the training actors of outer fold "
            f"{fold} only; used for all folds, the other folds would be scored on test actors "
            "that helped choose them. Run `python jobs/tune_adamw.py --nested` (one search per "
            "outer fold, each on its own training actors) and pass its best.json, or pass "
            "--allow-leaky-params to run anyway (the summary then says so)"
        )
    return {
        **out,
        "nested": False,
        "leaky": True,
        "tuned_on_fold": fold,
        "tuned_on": {
            "fit_actors": search.get("fit_actors"),
            "val_actors": search.get("val_actors"),
        },
        "note": f"LEAKY: settings tuned on outer fold {fold}'s training actors were used for "
        f"every fold, so folds other than {fold} are scored on actors that helped choose them "
        "(--allow-leaky-params)",
    }


def train_config_for(
    cfg: KFoldConfig, fold: int | None = None, variant: Variant | None = None
) -> TrainConfig:
    """An SSL variant's training settings (``variant``'s encoder and mode; by default the
    fine-tuned wav2vec2's): defaults (a probe's: :data:`PROBE_DEFAULTS` where the flags leave
    the study's) < ``--params`` file < the study's own.

    The study's own are :data:`STUDY_FIELDS` of ``cfg.train`` (``--model``, ``--epochs``,
    ...) and every other field of ``cfg.train`` changed from its default (``--lr``,
    ``--lr-head``). A nested sweep's file (``{"per_fold": {"k": {"params": …}}}``) gives each
    outer fold the settings tuned on that fold's own training actors; ``fold`` picks them. A
    single-fold sweep's file is refused (see :func:`params_provenance`) unless
    ``allow_leaky_params``.
    """
    tuned = _tuned_params(cfg, fold)
    unknown = set(tuned) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{cfg.params}: unknown training settings {sorted(unknown)}")
    default = study_train_config()
    own = {
        name: value
        for name, value in cfg.train.to_dict().items()
        if name in STUDY_FIELDS or value != getattr(default, name)
    }
    probe = bool(variant and variant.probe)
    unchanged = {
        k: v for k, v in PROBE_DEFAULTS.items() if getattr(cfg.train, k) == getattr(default, k)
    }
    probe_defaults = unchanged if probe else {}
    own.update(
        model=cfg.model_for(variant.family if variant else "wav2vec2"),
        probe=probe,
        epochs=1 if cfg.smoke_test else probe_defaults.get("epochs", cfg.train.epochs),
    )
    return TrainConfig(**{**cfg.train.to_dict(), **probe_defaults, **tuned, **own})


def _tuned_params(cfg: KFoldConfig, fold: int | None) -> dict[str, Any]:
    """The TrainConfig values the ``--params`` file gives ``fold`` (``{}`` without one)."""
    best = _read_params(cfg)
    if best is None:
        return {}
    params_provenance(cfg)  # raises on leaky settings that were not allowed
    if "per_fold" in best:
        if fold is None or str(fold) not in best["per_fold"]:
            raise ValueError(
                f"{cfg.params} holds per-fold settings for folds "
                f"{sorted(best['per_fold'])}, not for fold {fold}; run jobs/tune_adamw.py "
                "--nested over every outer fold"
            )
        best = best["per_fold"][str(fold)]
    return dict(best.get("params", best))


def _param_folds(cfg: KFoldConfig) -> list[int | None]:
    """The folds a ``--params`` file gives settings for (``[None]``: the same for all)."""
    best = _read_params(cfg)
    if best and "per_fold" in best:
        return sorted(int(k) for k in best["per_fold"])
    return [None]
