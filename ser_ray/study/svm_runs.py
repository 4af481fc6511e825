"""An SVM variant's folds in the study: its nested CV (:func:`ser_ray.sweeps.svm.run_nested_svm`)
on the study's features (``svm+ssl``: a frozen encoder's pooled layers), and its results kept in
the run location so that ``--resume`` does not search again.
"""

from __future__ import annotations

import io
import json
import logging

import pandas as pd

from ser_ray.common import config_file, storage
from ser_ray.corpus.protocol import Protocol
from ser_ray.models import svm
from ser_ray.study.config import KFoldConfig
from ser_ray.study.encoders import encoder_for_every_node, encoder_of
from ser_ray.study.variants import Variant

log = logging.getLogger(__name__)


def _with_ssl_features(
    df: pd.DataFrame, features_dir: str, cfg: KFoldConfig, out: str, variant: Variant
) -> tuple[pd.DataFrame, str]:
    """``df`` with every clip's pooled layers under the frozen encoder of ``svm+ssl``
    (the probes' feature cache in ``OUT/feature_cache``, built here unless there), and that
    encoder resolved (``demo``: the demo encoder's folder)."""
    from ser_ray.distributed import feature_cache

    encoder = encoder_for_every_node(encoder_of(cfg, variant), cfg, out)
    cache = feature_cache.build_feature_cache(
        features_dir, storage.join(out, "feature_cache"), model=encoder, probe=True
    )
    values = feature_cache.cached_values(cache)
    return df.assign(**{svm.SSL_COLUMN: [values[p] for p in df["path"]]}), encoder


def class_weighted_grid(class_weight: str, smoke_test: bool) -> list[dict] | None:
    """The SVM grid for ``--class-weight``: None (the fixed grid, which searches the SVC's
    ``class_weight`` None and ``balanced`` by inner-CV UA, as it always did) for ``auto``;
    for ``none`` or ``balanced`` its points of that class weight only (half the grid)."""
    if class_weight == "auto":
        return None
    wanted = None if class_weight == "none" else class_weight
    return [p for p in svm.svm_grid(smoke_test) if p["class_weight"] == wanted]


def svm_results(
    df: pd.DataFrame,
    cfg: KFoldConfig,
    protocol: Protocol,
    out: str,
    variant: Variant,
    features_dir: str,
) -> tuple[list[dict], pd.DataFrame]:
    """``variant``'s per-fold rows and out-of-fold predictions: those saved in ``out`` by an
    earlier run with ``--resume``, else its nested CV's (then saved there)."""
    from ser_ray.sweeps.svm import NestedSvmConfig, run_nested_svm

    done_json = storage.join(out, f"{variant.name}_folds.json")
    done_csv = storage.join(out, f"predictions_{variant.name}.csv")
    if cfg.resume and storage.exists(done_json) and storage.exists(done_csv):
        log.info("%s folds already done in %s; reusing them", variant.name, done_json)
        predictions = pd.read_csv(io.BytesIO(storage.read_bytes(done_csv)))
        return json.loads(storage.read_text(done_json)), predictions
    encoder = None
    if variant.feature_set == "ssl":
        df, encoder = _with_ssl_features(df, features_dir, cfg, out, variant)
    result = run_nested_svm(
        df,
        NestedSvmConfig(
            search=cfg.svm_search,
            grid=class_weighted_grid(cfg.train.class_weight, cfg.smoke_test),
            num_samples=cfg.svm_num_samples,
            seed=cfg.train.seed,
            smoke_test=cfg.smoke_test,
            feature_set=variant.feature_set,
            speaker_normalise=variant.speaker_norm,
            variant=variant.name,
            encoder=encoder,
            solver=cfg.svm_solver,
            approx_min_clips=cfg.svm_approx_min_clips,
            approx_components=cfg.svm_approx_components,
        ),
        protocol,
        storage_path=storage.join(out, "tune_svm"),
        models_dir=storage.join(out, "svm_models", variant.name),
    )
    storage.write_text(done_json, json.dumps(config_file.to_jsonable(result.folds), indent=2))
    storage.write_text(done_csv, result.predictions.to_csv(index=False))
    return result.folds, result.predictions
