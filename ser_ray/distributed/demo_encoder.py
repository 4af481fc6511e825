"""The offline demo encoder: the demo-size wav2vec2 pre-trained once, self-supervised.

``--model demo`` names it: the demo-size config (:func:`ser_ray.models.ssl.demo_config`)
pre-trained (:mod:`ser_ray.training.pretrain`) on the package's synthetic unlabeled pool, whose
voices and sentences differ from the demo corpus's and which carries no emotion labels
(:func:`ser_ray.corpus.demo_corpus.unlabeled_pool_clips`). It is built on first use,
deterministic (fixed seeds, and the same number of torch threads on every machine), and cached
under ``$SER_RAY_CACHE`` (default ``~/.cache/ser_ray``) in a folder named by a hash of its
settings. ``--model demo-random`` is the same architecture with
random weights (the reference the pre-training is measured against).

The build runs in the calling process (the job's driver), not in a ``TorchTrainer``: the model
is tiny, one process trains it, and nothing else runs meanwhile; a trainer of one worker
cost ~12 s to start and ~0.9 s an epoch of reports and checkpoint copies, a quarter of the
build on 2 cores (docs/benchmarks.md). It still checkpoints every epoch: a build cut off
resumes from its last epoch the next time it is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ser_ray.common import storage
from ser_ray.distributed import console
from ser_ray.distributed.resources import DEMO_ENCODER_THREADS
from ser_ray.features.unlabeled import read_pool, write_demo_pool
from ser_ray.models.ssl import DEMO_MODEL, RANDOM_DEMO_MODEL
from ser_ray.training.pretrain import MODEL_DIR, RESULT_FILE, PretrainConfig

log = logging.getLogger(__name__)

#: Size of the pool and length of the pre-training; "smoke" is the --smoke-test version.
DEMO_ENCODER_SIZES = {
    "full": {
        "pool": {"n_speakers": 40, "clips_per_speaker": 8},  # 320 clips, ~2.5 s each
        # 1,600 steps of 8 crops of 1.5 s (430-498 s on 2 cores, 2026-12-02). The contrastive loss
        # sits at ln(1 + 50 negatives) = 3.93 for the first ~300 steps, so a shorter run
        # learns nothing (6 epochs did: fine-tuning from it scored below random weights);
        # 40 epochs bring it to ~3.2, and fine-tuning from it beats random weights.
        "pretrain": {"epochs": 40, "batch_size": 8, "crop_s": 1.5, "lr": 1e-3},
    },
    "smoke": {
        "pool": {"n_speakers": 4, "clips_per_speaker": 4},
        "pretrain": {"epochs": 1, "batch_size": 8},
    },
}


def _settings(size: str) -> dict:
    if size not in DEMO_ENCODER_SIZES:
        raise ValueError(f"demo encoder size must be one of {sorted(DEMO_ENCODER_SIZES)}")
    spec = DEMO_ENCODER_SIZES[size]
    pretrain = PretrainConfig(model=RANDOM_DEMO_MODEL, **spec["pretrain"])  # from scratch
    return {
        "pool": spec["pool"],
        "pretrain": dataclasses.asdict(pretrain),
        "torch_threads": DEMO_ENCODER_THREADS,  # part of the cache key: it changes the weights
    }


def demo_encoder_dir(size: str = "full") -> Path:
    """The cache folder of the demo encoder of ``size`` (its settings' hash in the name)."""
    settings = json.dumps(_settings(size), sort_keys=True)
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return storage.node_cache_dir() / f"demo_encoder_{size}_{key}"


def ensure_demo_encoder(size: str = "full") -> Path:
    """The demo encoder's HF checkpoint folder; pre-trains it here first if it is not cached."""
    root = demo_encoder_dir(size)
    model_dir = root / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    with storage.node_lock(root.parent / f".{root.name}.lock"):  # a second builder waits
        if not (model_dir / "model.safetensors").exists():
            _build(size, root)
    return model_dir


def _build(size: str, root: Path) -> None:
    """Pre-train the demo encoder of ``size`` into ``root`` (``model/`` appears complete)."""
    model_dir = root / "model"
    settings = _settings(size)
    log.info(
        "--model demo: pre-training the demo encoder once (%s pool, %d epochs; 2 to 5 "
        "minutes on 2 cores for the full one), cached in %s",
        settings["pool"],
        settings["pretrain"]["epochs"],
        root,
    )
    t0 = time.perf_counter()
    pool = write_demo_pool(root / "pool", **settings["pool"])
    built = pretrain_here(
        pool,
        root / "build",
        PretrainConfig.from_dict(settings["pretrain"]),
        torch_threads=settings["torch_threads"],
        on_report=console.pretrain_progress("demo encoder", settings["pretrain"]["epochs"]),
    )
    shutil.copytree(built / MODEL_DIR, root / ".model.tmp", dirs_exist_ok=True)
    shutil.copy2(built / RESULT_FILE, root / "result.json")
    (root / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(root / ".model.tmp", model_dir)  # complete or absent
    shutil.rmtree(root / "build", ignore_errors=True)
    log.info("demo encoder ready in %.0f s: %s", time.perf_counter() - t0, model_dir)


def pretrain_here(
    pool: Path,
    build_dir: Path,
    cfg: PretrainConfig,
    *,
    torch_threads: int,
    on_report: Callable[[dict[str, Any]], None],
) -> Path:
    """Pre-train on ``pool`` in this process, on the CPU with ``torch_threads`` torch threads
    (the caller's count is restored after); returns the last epoch's checkpoint folder
    (``model/``, ``result.json``, train state).

    Every epoch's checkpoint goes to ``build_dir/epoch_<n>`` (complete once its
    ``result.json`` is written, the older one removed after); a build cut off resumes from
    the newest complete one, to the same weights. ``on_report`` gets every epoch's metrics.
    """
    import torch

    from ser_ray.training import engine as eng
    from ser_ray.training.pretrain import build_pretraining_model, run_pretraining

    def complete() -> list[Path]:
        done = [p for p in build_dir.glob("epoch_*") if (p / RESULT_FILE).exists()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def on_epoch_end(metrics: dict[str, Any], write: Callable[[Path], Path]) -> None:
        previous = complete()
        write(build_dir / f"epoch_{metrics['epoch']}")
        for old in previous:
            shutil.rmtree(old, ignore_errors=True)
        on_report(metrics)

    build_dir.mkdir(parents=True, exist_ok=True)
    resume = complete()[-1] if complete() else None
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        eng.seed_everything(cfg.seed)
        model, fe = build_pretraining_model(cfg)
        eng.seed_everything(cfg.seed, 0)
        run_pretraining(
            cfg, model, fe, read_pool(pool), resume_from=resume, on_epoch_end=on_epoch_end,
            log_dir=build_dir / "tensorboard",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return complete()[-1]


def resolve_model(name: str, smoke_test: bool = False) -> str:
    """What ``load_model`` gets for a ``--model`` value: ``demo`` -> the pre-trained demo
    encoder's folder (built on first use); anything else unchanged (``demo-random`` is
    ``load_model``'s own name of the random-weight demo-size model)."""
    if name == DEMO_MODEL:
        return str(ensure_demo_encoder("smoke" if smoke_test else "full"))
    return name
