"""The main study: features -> SVM variants' nested CV -> wav2vec2 on six folds concurrently
-> one summary with the named variants side by side (:mod:`ser_ray.study.variants`).

Each outer fold of wav2vec2 is one Ray Tune trial, and each trial drives a Ray Train
``TorchTrainer`` running :func:`ser_ray.distributed.fold_trainer.train_fold_per_worker` (Ray Train
V2 + Tune interop). The trial itself only reserves a token CPU; the trainer reserves its workers
(CPUs, fractional GPUs) in its own placement group, so all six folds run at once when the
cluster has room and queue otherwise. Two layers of fault tolerance:

- a training worker that dies is restarted by Ray Train (``FailureConfig``) from the fold's
  last epoch checkpoint;
- a driver that dies is continued with ``resume=True`` (``Tuner.restore``): finished folds
  are not re-run, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from ser_ray.common import config_file
from ser_ray.corpus import folds, ravdess
from ser_ray.corpus.demo_corpus import demo_source
from ser_ray.distributed import console
from ser_ray.distributed.prepare import prepare_features
from ser_ray.features.featurize import FeatureConfig, load_features
from ser_ray.models import svm
from ser_ray.study.variants import DEFAULT_VARIANTS, Variant, parse_variants
from ser_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

REAL_MODEL = "facebook/wav2vec2-base"
#: Which actors of an outer fold each variant's reported model trained on, by (family, refit).
TRAINED_ON = {
    ("svm", False): "all 20 training actors (settings chosen by inner CV over them, then refit "
    "on all of them)",
    ("wav2vec2", False): "the fit actors only: the validation actors (taken from the training "
    "side) choose the best epoch and are never trained on (--refit trains on all of them)",
    ("wav2vec2", True): "all training actors (--refit: retrained on fit + validation actors "
    "for the best epoch count found with the validation actors held out)",
}


@dataclasses.dataclass
class KFoldConfig:
    """Settings of the study (the resolved copy is saved as ``config.json``)."""

    data_dir: str | None = None  # RAVDESS folder/URI; None: the embedded demo corpus
    model: str | None = None  # hub id, local folder or "demo"; None: demo without data_dir
    folds: str = "contiguous"  # fold scheme: contiguous | emobox
    merge_calm: bool = False  # 7 classes (calm merged into neutral) instead of 8
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # named variants; differences vs the first
    epochs: int = 8  # wav2vec2 epochs per fold
    batch_size: int = 8  # clips per micro-batch
    lr: float | None = None  # peak LR of the encoder (default: TrainConfig's)
    lr_head: float | None = None  # peak LR of the head (default: TrainConfig's)
    params: str | None = None  # best.json of jobs/tune_adamw.py --nested (AdamW settings)
    allow_leaky_params: bool = False  # accept a single-fold sweep's settings for every fold
    refit: bool = False  # retrain wav2vec2 on fit + validation actors for the best epoch count
    workers_per_fold: int = 1  # Ray Train workers (DDP) per fold
    concurrent_folds: int | None = None  # folds trained at once; None: all of them
    gpus_per_fold: float | None = None  # None: share the cluster's GPUs over the folds
    cpus_per_worker: float | None = None  # None: share the cluster's CPUs over the folds
    max_failures: int = 2  # worker restarts per fold before the fold fails
    svm_search: str = "grid"  # grid | bayes
    svm_num_samples: int = 20  # Bayesian SVM trials per fold
    tapt_epochs: int = 0  # per-fold continued pre-training on training actors' audio; 0 = off
    storage_path: str | None = None  # Tune/Train storage (local or s3://); None: <out>/ray
    resume: bool = False  # continue an interrupted run in the same --out/--storage-path
    out: str = "runs/kfold"  # run folder
    smoke_test: bool = False  # tiny corpus, one epoch, small SVM grid
    seed: int = 0

    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return "demo" if self.data_dir is None else REAL_MODEL

    def __post_init__(self) -> None:
        self.variants = tuple(v.name for v in parse_variants(self.variants))  # raises
        if self.svm_search not in ("grid", "bayes"):
            raise ValueError(f"svm_search={self.svm_search!r}: choose grid or bayes")
        folds.fold_sets(self.folds)  # raises on an unknown scheme
        if self.tapt_epochs < 0:
            raise ValueError(f"tapt_epochs must be >= 0, got {self.tapt_epochs}")


def _read_params(cfg: KFoldConfig) -> dict[str, Any] | None:
    return json.loads(Path(cfg.params).read_text()) if cfg.params else None


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


def train_config_for(cfg: KFoldConfig, fold: int | None = None) -> TrainConfig:
    """The wav2vec2 training settings: defaults < ``--params`` file < explicit flags.

    A nested sweep's file (``{"per_fold": {"k": {"params": …}}}``) gives each outer fold the
    settings tuned on that fold's own training actors; ``fold`` picks them. A single-fold
    sweep's file is refused (see :func:`params_provenance`) unless ``allow_leaky_params``.
    """
    values: dict[str, Any] = {}
    best = _read_params(cfg)
    if best is not None:
        params_provenance(cfg)  # raises on leaky settings that were not allowed
        if "per_fold" in best:
            if fold is None or str(fold) not in best["per_fold"]:
                raise ValueError(
                    f"{cfg.params} holds per-fold settings for folds "
                    f"{sorted(best['per_fold'])}, not for fold {fold}; run jobs/tune_adamw.py "
                    "--nested over every outer fold"
                )
            best = best["per_fold"][str(fold)]
        values.update(best.get("params", best))
    values.update(
        model=cfg.resolved_model(),
        epochs=1 if cfg.smoke_test else cfg.epochs,
        batch_size=cfg.batch_size,
        merge_calm=cfg.merge_calm,
        seed=cfg.seed,
        refit=cfg.refit,
    )
    if cfg.lr is not None:
        values["lr_encoder"] = cfg.lr
    if cfg.lr_head is not None:
        values["lr_head"] = cfg.lr_head
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{cfg.params}: unknown training settings {sorted(unknown)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)


def gpus_per_worker(gpus_per_fold: float, workers_per_fold: int) -> float:
    """GPUs each Ray Train worker of a fold reserves; correct by construction.

    One worker per fold may take a fraction of a GPU (several folds share a device, each in
    its own process). DDP ranks (``workers_per_fold > 1``) must each get a whole, distinct
    GPU: Ray's fractional GPU ids are not unique, so two ranks could land on one device,
    which NCCL refuses. Raises ``ValueError`` for anything else.
    """
    if gpus_per_fold <= 0:
        return 0.0
    if workers_per_fold == 1:
        return float(gpus_per_fold)
    per_worker = gpus_per_fold / workers_per_fold
    if per_worker < 1 or per_worker != int(per_worker):
        raise ValueError(
            f"--gpus-per-fold {gpus_per_fold} with --workers-per-fold {workers_per_fold}: "
            "each DDP worker needs whole GPUs of its own (fractional GPUs would put two ranks "
            f"on one device, which NCCL refuses); use --gpus-per-fold "
            f"{workers_per_fold} (or a multiple), or --workers-per-fold 1 to share GPUs"
        )
    return per_worker


def fold_resources(cfg: KFoldConfig, n_folds: int) -> dict[str, Any]:
    """Per-fold Train resources from the flags or, by default, a fair share of the cluster
    among ``n_folds`` folds running at once."""
    import ray

    cluster = ray.cluster_resources()
    n_cpus, n_gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    gpus_per_fold = cfg.gpus_per_fold
    if gpus_per_fold is None:  # DDP: one whole GPU per worker; one worker: a fair share
        share = min(1.0, n_gpus / n_folds) if cfg.workers_per_fold == 1 else cfg.workers_per_fold
        gpus_per_fold = float(share) if n_gpus else 0.0
    use_gpu = gpus_per_fold > 0
    if use_gpu and not n_gpus:
        raise ValueError(f"--gpus-per-fold {gpus_per_fold}: this Ray cluster has no GPU")
    gpus = gpus_per_worker(gpus_per_fold, cfg.workers_per_fold)
    if gpus > n_gpus:
        raise ValueError(
            f"each worker needs {gpus:g} GPU(s) but this Ray cluster has {n_gpus:g}; lower "
            "--workers-per-fold or --gpus-per-fold"
        )
    cpus = cfg.cpus_per_worker
    if cpus is None:
        # Keep about one CPU free for the trial actors and the Ray Data tasks that stream each
        # fold's clips into its workers (ser_ray.distributed.ingest: they reserve no CPU, but use
        # some).
        budget = n_cpus - 1 if n_cpus >= 2 else n_cpus / 2
        cpus = min(4.0, max(0.05, int(100 * budget / (n_folds * cfg.workers_per_fold)) / 100))
    per_worker: dict[str, float] = {"CPU": cpus}
    if use_gpu:
        per_worker["GPU"] = gpus
    return {"use_gpu": use_gpu, "resources_per_worker": per_worker}


def _fold_trial(config: dict[str, Any], train: dict[str, Any]) -> None:
    """One Tune trial = one outer fold (``config["fold"]``), trained by a TorchTrainer (runs
    on the cluster); ``train`` holds what every fold shares (``tune.with_parameters``)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from ser_ray.distributed.fold_trainer import build_fold_trainer

    fold = int(config["fold"])
    loop_config = {
        **train["train_configs"][str(fold)],
        **train["inputs"][str(fold)],  # source, input_kind, feature_cache_key
        "fold": fold,
        "scheme": train["scheme"],
        "log_dir": str(Path(train["tensorboard_dir"]) / f"fold_{fold}"),
    }
    trainer = build_fold_trainer(
        loop_config,
        num_workers=train["workers_per_fold"],
        use_gpu=train["use_gpu"],
        resources_per_worker=train["resources_per_worker"],
        storage_path=train["storage_path"],
        name=f"fold_{fold}",  # stable: a restarted trial resumes this run's checkpoints
        max_failures=train["max_failures"],
        callbacks=[TuneReportCallback()],  # RAY: Train reports -> this Tune trial
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def run_wav2vec2_folds(
    features_dir: Path,
    cfg: KFoldConfig,
    train_cfgs: dict[int, TrainConfig],
    out: Path,
    storage: str,
) -> list[dict[str, Any]]:
    """All folds as concurrent Tune trials; returns per fold metrics, history, predictions."""
    from ray import tune

    from ser_ray.distributed.fold_trainer import PREDICTIONS_FILE
    from ser_ray.training.checkpoints import BEST_MODEL_DIR

    fold_numbers = list(range(1, len(folds.fold_sets(cfg.folds)) + 1))
    first = train_cfgs[fold_numbers[0]]
    concurrent = min(cfg.concurrent_folds or len(fold_numbers), len(fold_numbers))
    resources = fold_resources(cfg, concurrent)
    log.info("wav2vec2: %d folds, per worker %s", len(fold_numbers), resources)
    train = {
        "inputs": {str(k): v for k, v in fold_inputs(features_dir, train_cfgs, out).items()},
        "scheme": cfg.folds,
        "train_configs": {str(k): train_cfgs[k].to_dict() for k in fold_numbers},
        "workers_per_fold": cfg.workers_per_fold,
        "max_failures": cfg.max_failures,
        "storage_path": storage,
        "tensorboard_dir": str(out / "tensorboard"),
        **resources,
    }
    # the param space is the fold number only: Tune's tables and saved state stay small
    trainable = tune.with_resources(tune.with_parameters(_fold_trial, train=train), {"CPU": 0.01})
    experiment = f"{storage.rstrip('/')}/wav2vec2_folds"
    if cfg.resume and tune.Tuner.can_restore(experiment):
        log.info("resuming %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"fold": tune.grid_search(fold_numbers)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name="wav2vec2_folds",
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=console.tune_verbosity(),
                callbacks=[console.fold_progress_callback("wav2vec2", first.epochs)],
            ),
        )
    grid = tuner.fit()
    outcomes = []
    for result in sorted(grid, key=lambda r: r.config["fold"]):
        fold = int(result.config["fold"])
        if result.error is not None:
            raise RuntimeError(f"wav2vec2 fold {fold} failed: {result.error}") from result.error
        import ray.train

        fold_dir = out / "wav2vec2" / f"fold_{fold}"
        shutil.rmtree(fold_dir, ignore_errors=True)
        ray.train.Checkpoint(result.metrics["checkpoint_path"]).to_directory(str(fold_dir))
        info = json.loads((fold_dir / "result.json").read_text())
        outcomes.append(
            {
                "fold": fold,
                "metrics": info["metrics"],
                "history": info["history"],
                "predictions": pd.read_csv(fold_dir / PREDICTIONS_FILE),
                "model_dir": str(fold_dir / BEST_MODEL_DIR),
            }
        )
    return outcomes


def fold_inputs(
    features_dir: Path, train_cfgs: dict[int, TrainConfig], out: Path
) -> dict[int, dict[str, Any]]:
    """What each fold's workers read: the features, or with ``use_feature_cache`` the cache of
    the fold's frozen part, built here before the folds start (Ray Data tasks need CPUs the
    running folds would hold). Folds with the same model share one cache; after TAPT every
    fold has its own encoder, CNN included, so each gets its own."""
    from ser_ray.distributed.feature_cache import build_feature_cache

    waveform = {"source": str(features_dir), "input_kind": "waveform", "feature_cache_key": None}
    caches: dict[tuple[str, bool], dict[str, Any]] = {}
    inputs = {}
    for fold, train_cfg in sorted(train_cfgs.items()):
        if not train_cfg.use_feature_cache:
            inputs[fold] = waveform
            continue
        model = (train_cfg.model, train_cfg.probe)
        if model not in caches:
            cache = build_feature_cache(
                features_dir, out / "feature_cache", train_config=train_cfg, use_gpu=False
            )
            caches[model] = {
                "source": str(cache.path),
                "input_kind": cache.kind,
                "feature_cache_key": cache.key,
            }
        inputs[fold] = caches[model]
    return inputs


def _with_encoders(
    train_cfgs: dict[int, TrainConfig], features_dir: Path, cfg: KFoldConfig, out: Path, storage
) -> dict[int, TrainConfig]:
    """The fold configs with the encoder each fold fine-tunes: ``--model`` resolved (``demo``:
    the pre-trained demo encoder, built on first use) and, with ``--tapt-epochs``, each
    fold's own continued pre-training on its training actors."""
    from ser_ray.distributed import tapt
    from ser_ray.distributed.demo_encoder import resolve_model

    base = resolve_model(cfg.resolved_model(), cfg.smoke_test)
    models = {k: base for k in train_cfgs}
    if cfg.tapt_epochs:
        concurrent = min(cfg.concurrent_folds or len(train_cfgs), len(train_cfgs))
        models = tapt.run_tapt_folds(
            features_dir,
            base,
            list(train_cfgs),
            scheme=cfg.folds,
            settings=tapt.tapt_config(base, cfg.tapt_epochs, cfg.seed, cfg.smoke_test),
            out_dir=out / "tapt",
            resources=fold_resources(cfg, concurrent),
            max_failures=cfg.max_failures,
        )
    return {k: dataclasses.replace(c, model=models[k]) for k, c in train_cfgs.items()}


def _svm_results(
    df: pd.DataFrame, cfg: KFoldConfig, out: Path, variant: Variant
) -> tuple[list[dict], pd.DataFrame]:
    from ser_ray.sweeps.svm import NestedSvmConfig, run_nested_svm

    done_json = out / f"{variant.name}_folds.json"
    done_csv = out / f"predictions_{variant.name}.csv"
    if cfg.resume and done_json.exists() and done_csv.exists():
        log.info("%s folds already done in %s; reusing them", variant.name, done_json)
        return json.loads(done_json.read_text()), pd.read_csv(done_csv)
    result = run_nested_svm(
        df,
        NestedSvmConfig(
            search=cfg.svm_search,
            num_samples=cfg.svm_num_samples,
            scheme=cfg.folds,
            merge_calm=cfg.merge_calm,
            seed=cfg.seed,
            smoke_test=cfg.smoke_test,
            feature_set=variant.feature_set,
            speaker_normalise=variant.speaker_norm,
            variant=variant.name,
        ),
        storage_path=out / "tune_svm",
        models_dir=out / "svm_models" / variant.name,
    )
    done_json.write_text(json.dumps(config_file.to_jsonable(result.folds), indent=2))
    result.predictions.to_csv(done_csv, index=False)
    return result.folds, result.predictions


def run_kfold(cfg: KFoldConfig) -> dict[str, Any]:
    """Run the study into ``cfg.out`` and return the summary (Ray must be initialised)."""
    from ser_ray.study import summary

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage_path or str(out / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    fold_numbers = range(1, len(folds.fold_sets(cfg.folds)) + 1)
    provenance = params_provenance(cfg)  # refuses leaky settings before anything runs
    train_cfgs = {k: train_config_for(cfg, k) for k in fold_numbers}
    train_cfg = train_cfgs[1]
    variants = parse_variants(cfg.variants)
    runs_wav2vec2 = any(v.family == "wav2vec2" for v in variants)
    config_file.save_config(
        out,
        {
            "job": "kfold",
            "kfold": cfg,
            "variants": {v.name: v.describe() for v in variants},
            "model": cfg.resolved_model(),
            "train": train_cfg if cfg.params is None else train_cfgs,
            "params_provenance": provenance,
            "storage_path": storage,
            "ser_ray_version": _version(),
        },
    )
    if runs_wav2vec2:
        check_model_reachable(cfg.resolved_model())  # before minutes of features and SVMs
    source = cfg.data_dir or str(demo_source(smoke_test=cfg.smoke_test))
    prepared = prepare_features(source, out / "prepared", FeatureConfig(fold_scheme=cfg.folds))
    shutil.copy2(prepared.rejected_csv, out / "rejected.csv")
    columns = {c for v in variants if v.family == "svm" for c in svm.FEATURE_SETS[v.feature_set]}
    df = load_features(prepared.features_dir, ["path", "actor", "emotion", *sorted(columns)])
    folds.check_actors(df["actor"].unique().tolist(), cfg.folds)

    class_names = ravdess.class_names(cfg.merge_calm)
    fold_rows = {
        k: {"fold": k, "test_actors": actors, "n_test": int(df["actor"].isin(actors).sum())}
        for k, actors in enumerate(folds.fold_sets(cfg.folds), 1)
    }
    predictions = []
    histories: dict[int, list[dict]] = {}
    for variant in variants:
        if variant.family == "svm":
            svm_folds, svm_predictions = _svm_results(df, cfg, out, variant)
            for row in svm_folds:
                keys = (variant.name, f"{variant.name}_params", f"{variant.name}_search_s")
                fold_rows[row["fold"]].update({key: row.get(key) for key in keys})
            predictions.append(svm_predictions)
            continue
        train_cfgs = _with_encoders(train_cfgs, prepared.features_dir, cfg, out, storage)
        for outcome in run_wav2vec2_folds(prepared.features_dir, cfg, train_cfgs, out, storage):
            m = outcome["metrics"]
            fold_rows[outcome["fold"]]["wav2vec2"] = {
                "accuracy": m["test/accuracy"],
                "uar": m["test/uar"],
                "macro_f1": m["test/macro_f1"],
                "best_epoch": int(m["best_epoch"]),
            }
            histories[outcome["fold"]] = outcome["history"]
            predictions.append(outcome["predictions"])
    all_predictions = pd.concat(predictions, ignore_index=True)
    all_predictions.to_csv(out / "predictions.csv", index=False)
    return summary.write_summary(
        out,
        list(fold_rows.values()),
        all_predictions,
        class_names,
        summary.RunInfo(
            model=cfg.resolved_model() + ("+tapt" if cfg.tapt_epochs else "")
            if runs_wav2vec2
            else None,
            merge_calm=cfg.merge_calm,
            fold_scheme=cfg.folds,
            config=config_file.to_jsonable(dataclasses.asdict(cfg)),
            params_provenance=provenance,
            trained_on=trained_on(cfg, train_cfgs),
            variants={v.name: v.describe() for v in variants},
        ),
        histories=histories or None,
        lr_schedule=encoder_lr_schedule(train_cfgs[min(histories)], histories[min(histories)])
        if histories
        else None,
        expected_paths=df["path"].tolist(),
    )


def check_model_reachable(model: str) -> None:
    """Stop at once when ``--model`` names neither a demo encoder, nor a folder, nor a hub
    id whose config can be fetched (offline, a hub id fails here, not after the features)."""
    from transformers import AutoConfig

    from ser_ray.distributed.demo_encoder import RANDOM_DEMO_MODEL
    from ser_ray.models.ssl import DEMO_MODEL

    if model in (DEMO_MODEL, RANDOM_DEMO_MODEL):
        return
    try:
        AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--model {model!r}: no local folder and the hub cannot give its config ({err}). "
            "Point --model at a downloaded copy (a folder with config.json), or use "
            "--model demo offline"
        ) from err


def trained_on(cfg: KFoldConfig, train_cfgs: dict[int, TrainConfig]) -> dict[str, Any]:
    """Per variant: which actors of each outer fold its reported model was trained on."""
    out: dict[str, Any] = {}
    for variant in parse_variants(cfg.variants):
        refit = variant.family == "wav2vec2" and cfg.refit
        per_fold = {}
        for k, train_cfg in train_cfgs.items():
            _, fit, val = folds.fold_split(k, cfg.folds, train_cfg.n_val_actors)
            per_fold[str(k)] = sorted(fit + val) if variant.family == "svm" or refit else fit
        out[variant.name] = {"description": TRAINED_ON[variant.family, refit], "per_fold": per_fold}
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


def _version() -> str:
    from importlib.metadata import version

    return version("ser_ray")
