"""A ``--params`` file (tuned AdamW settings, ``jobs/tune_adamw.py``'s ``best.json``) and the
SSL training settings of every fold it leads to: defaults < the file < the study's own flags.

The file is read and checked once (:func:`read_params`) into a :class:`TunedParams`: where its
settings come from (refused if settings tuned on one fold's speakers would score the others), and
its settings, per fold or for all; every fold of every variant then takes its settings from that
object (:func:`train_config_for`), not from the file again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ser_ray.common.errors import SettingsError
from ser_ray.study.config import PROBE_DEFAULTS, STUDY_FIELDS, KFoldConfig, study_train_config
from ser_ray.study.variants import Variant
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TunedParams:
    """A ``--params`` file, read and checked: its TrainConfig values (``per_fold`` for a nested
    sweep's file, each outer fold's own; else ``shared`` by every fold) and their
    ``provenance`` (saved in ``config.json`` and the summary)."""

    file: str
    provenance: dict[str, Any]
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_fold: dict[int, dict[str, Any]] | None = None

    def folds(self) -> list[int | None]:
        """The folds the file gives settings for (``[None]``: the same for all)."""
        return sorted(self.per_fold) if self.per_fold is not None else [None]

    def sets(self) -> list[dict[str, Any]]:
        """Every set of settings the file holds."""
        return list(self.per_fold.values()) if self.per_fold is not None else [self.shared]

    def for_fold(self, fold: int | None) -> dict[str, Any]:
        """The TrainConfig values the file gives ``fold``."""
        if self.per_fold is None:
            return dict(self.shared)
        if fold not in self.per_fold:
            raise SettingsError(
                f"{self.file} holds per-fold settings for folds "
                f"{sorted(str(k) for k in self.per_fold)}, not for fold {fold}; run "
                "jobs/tune_adamw.py --nested over every outer fold"
            )
        return dict(self.per_fold[fold])


def read_params(cfg: KFoldConfig) -> TunedParams | None:
    """``cfg.params`` read and checked (None without one): ``ValueError`` for a single-fold
    sweep's settings unless ``allow_leaky_params``, or for settings TrainConfig does not have."""
    if not cfg.params:
        return None
    best = json.loads(Path(cfg.params).read_text())
    provenance = _provenance(best, cfg)  # raises on leaky settings that were not allowed
    current = TrainConfig.current_names  # a file written before a field's rename
    if "per_fold" in best:
        per_fold = {int(k): current(v.get("params", v)) for k, v in best["per_fold"].items()}
        params = TunedParams(cfg.params, provenance, per_fold=per_fold)
    else:
        params = TunedParams(cfg.params, provenance, shared=current(best.get("params", best)))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = {k for s in params.sets() for k in s} - known
    if unknown:
        raise SettingsError(f"{cfg.params}: unknown training settings {sorted(unknown)}")
    return params


def params_provenance(cfg: KFoldConfig) -> dict[str, Any] | None:
    """Where the ``--params`` settings come from: file, nested or not, the speakers they were
    tuned on per outer fold, and whether some folds' test speakers helped choose them (None
    without a file). Raises as :func:`read_params` does."""
    params = read_params(cfg)
    return params.provenance if params else None


def warn_study_fields_in_params(cfg: KFoldConfig, params: TunedParams | None) -> list[str]:
    """Warn (once, before anything runs) about :data:`STUDY_FIELDS` a ``--params`` file sets to
    other values than the study's: its flags decide those (:func:`train_config_for`), so the
    file's values are not used. Returns the fields warned about."""
    if params is None:
        return []
    study = cfg.train.to_dict()
    ignored = sorted(
        {k for s in params.sets() for k, v in s.items() if k in STUDY_FIELDS and study[k] != v}
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


def _provenance(best: dict[str, Any], cfg: KFoldConfig) -> dict[str, Any]:
    """:attr:`TunedParams.provenance` of the file's contents ``best``."""
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
            "note": "per outer fold: settings tuned on that fold's training speakers only",
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
        raise SettingsError(
            f"{cfg.params} holds AdamW settings tuned on the training speakers of outer fold "
            f"{fold} only; used for all folds, the other folds would be scored on test speakers "
            "that helped choose them. Run `python jobs/tune_adamw.py --nested` (one search per "
            "outer fold, each on its own training speakers) and pass its best.json, or pass "
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
        "note": f"LEAKY: settings tuned on outer fold {fold}'s training speakers were used for "
        f"every fold, so folds other than {fold} are scored on speakers that helped choose them "
        "(--allow-leaky-params)",
    }


def train_config_for(
    cfg: KFoldConfig,
    fold: int | None = None,
    variant: Variant | None = None,
    params: TunedParams | None = None,
) -> TrainConfig:
    """An SSL variant's training settings (``variant``'s encoder and mode; by default the
    fine-tuned wav2vec2's): defaults (a probe's: :data:`PROBE_DEFAULTS` where the flags leave
    the study's) < ``--params`` file < the study's own.

    The study's own are :data:`STUDY_FIELDS` of ``cfg.train`` (``--model``, ``--epochs``,
    ...) and every other field of ``cfg.train`` changed from its default (``--lr``,
    ``--lr-head``). A nested sweep's file (``{"per_fold": {"k": {"params": …}}}``) gives each
    outer fold the settings tuned on that fold's own training speakers; ``fold`` picks them.
    ``params`` is the file as :func:`read_params` loaded it (the driver loads it once);
    without it, ``cfg.params`` is read here (one fold's settings, e.g. a benchmark's).
    """
    params = params or read_params(cfg)
    tuned = params.for_fold(fold) if params else {}
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
