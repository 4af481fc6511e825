"""The offline demo encoder: the demo-size wav2vec2 pre-trained once, self-supervised.

``--model demo`` names it: the demo-size config (:func:`ser_ray.models.ssl.demo_config`)
pre-trained (:mod:`ser_ray.training.pretrain`) on the package's synthetic unlabeled pool, whose
voices and sentences differ from the demo corpus's and which carries no emotion labels
(:func:`ser_ray.corpus.demo_corpus.unlabeled_pool_clips`). It is built on first use,
deterministic (fixed seeds, and the same number of torch threads on every machine), and cached
under ``$SER_RAY_CACHE`` (default ``~/.cache/ser_ray``) in a folder named by a hash of its
settings. ``--model demo-random`` is the same architecture with
random weights (the reference the pre-training is measured against).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ser_ray.distributed import console
from ser_ray.distributed.pretrain_trainer import fit_pretraining
from ser_ray.distributed.resources import DEMO_ENCODER_THREADS, demo_encoder_resources
from ser_ray.features.unlabeled import write_demo_pool
from ser_ray.models.ssl import DEMO_MODEL, RANDOM_DEMO_MODEL
from ser_ray.training.pretrain import PretrainConfig

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
    cache = Path(os.environ.get("SER_RAY_CACHE", Path.home() / ".cache" / "ser_ray"))
    return cache / f"demo_encoder_{size}_{key}"


def ensure_demo_encoder(size: str = "full", use_gpu: bool = False) -> Path:
    """The demo encoder's HF checkpoint folder; pre-trains it first if it is not cached
    (Ray must be initialised)."""
    root = demo_encoder_dir(size)
    model_dir = root / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    settings = _settings(size)
    log.info(
        "--model demo: pre-training the demo encoder once (%s pool, %d epochs; 3 to 7 "
        "minutes on 2 cores for the full one), cached in %s",
        settings["pool"],
        settings["pretrain"]["epochs"],
        root,
    )
    t0 = time.perf_counter()
    pool = write_demo_pool(root / "pool", **settings["pool"])
    built = fit_pretraining(
        pool,
        root / "build",
        PretrainConfig.from_dict(settings["pretrain"]),
        use_gpu=use_gpu,
        resources_per_worker=demo_encoder_resources(),
        max_failures=1,
        torch_threads=settings["torch_threads"],
        on_report=console.pretrain_progress("demo encoder", settings["pretrain"]["epochs"]),
    )
    shutil.copytree(built, root / ".model.tmp", dirs_exist_ok=True)
    shutil.copy2(root / "build" / "result.json", root / "result.json")
    (root / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(root / ".model.tmp", model_dir)  # complete or absent
    log.info("demo encoder ready in %.0f s: %s", time.perf_counter() - t0, model_dir)
    return model_dir


def resolve_model(name: str, smoke_test: bool = False, use_gpu: bool = False) -> str:
    """What ``load_model`` gets for a ``--model`` value: ``demo`` -> the pre-trained demo
    encoder's folder (built on first use); anything else unchanged (``demo-random`` is
    ``load_model``'s own name of the random-weight demo-size model)."""
    if name == DEMO_MODEL:
        return str(ensure_demo_encoder("smoke" if smoke_test else "full", use_gpu=use_gpu))
    return name
