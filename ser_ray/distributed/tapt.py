"""Task-adaptive pre-training (TAPT, Chen & Rudnicky 2023), per outer fold.

Before fine-tuning fold k, the encoder continues its self-supervised pre-training on the
audio of fold k's *training* speakers only (never a test speaker's clip; labels are never read),
all folds at once, each a ``TorchTrainer`` of :mod:`ser_ray.training.pretrain` launched from a Ray
task. The CNN is trained too (see :func:`tapt_config`), so each fold's fine-tuning reads its
own frozen-CNN feature cache (:func:`ser_ray.distributed.fold_inputs.fold_inputs_per_fold`).

Each fold's result is cached in ``<out>/fold_<k>/<key>/model`` where ``key`` hashes the
base checkpoint (its weights), the fold, the fold scheme, the features and the settings: a
re-run with the same inputs skips the pre-training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ser_ray.common import storage
from ser_ray.corpus.folds import check_no_leakage
from ser_ray.corpus.protocol import Protocol
from ser_ray.distributed import console
from ser_ray.distributed.pretrain_trainer import fit_pretraining
from ser_ray.distributed.resources import TAPT_TASK_CPUS
from ser_ray.training.pretrain import RESULT_FILE, PretrainConfig

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 1.0  # how often the driver prints the folds' new epoch reports


def tapt_config(base_model: str, epochs: int, seed: int, smoke_test: bool) -> PretrainConfig:
    """Continued pre-training from ``base_model`` with the from-scratch recipe, CNN included.

    Measured on espeak-ng speech, fold 1, the demo encoder plus 10 TAPT epochs: test UA 32.0%
    with the CNN trained at 1e-3, 18.0% with it frozen at 5e-4 (no better than random
    weights), so the CNN adapts to the corpus too."""
    return PretrainConfig(model=base_model, epochs=1 if smoke_test else epochs, seed=seed)


def _fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint's weights or a features folder's config (local or on a
    URI); the name for a hub id."""
    digest = hashlib.sha256(str(path).encode())
    names = storage.list_names(path) if _is_folder(path) else []
    files = [storage.join(path, n) for n in names if n.endswith(".safetensors")]
    if names and not files:
        files = [storage.join(storage.parent(path), "config.json")]
    for f in files:
        if storage.exists(f):
            digest.update(storage.read_bytes(f))
    return digest.hexdigest()[:16]


def _is_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a folder (a hub id names none; a hub id is not a URI)."""
    return storage.is_uri(path) or Path(path).is_dir()


def tapt_key(base_model: str, speakers: list[int], features_dir, cfg: PretrainConfig) -> str:
    """What a fold's TAPT encoder depends on: the base model, the speakers it reads, the
    features and the settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    text = json.dumps(
        {
            "model": _fingerprint(base_model),
            "actors": sorted(int(a) for a in speakers),
            "features": _fingerprint(features_dir),
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tapt_speakers(fold: int, protocol: Protocol) -> list[int]:
    """The speakers whose audio TAPT for ``fold`` may read: the fold's training side."""
    test_speakers, train_speakers = protocol.test_and_train(fold)
    check_no_leakage(train_speakers, test_speakers)
    return train_speakers


def run_tapt_folds(
    features_dir: str | os.PathLike,
    base_model: str,
    fold_numbers: list[int],
    *,
    protocol: Protocol,
    settings: PretrainConfig,
    out_dir: str | os.PathLike,
    resources: dict[str, Any],
    max_failures: int = 2,
) -> dict[int, str]:
    """TAPT for every fold, concurrently; returns fold -> its encoder's checkpoint folder."""
    import ray
    from ray.util.queue import Queue

    models: dict[int, str] = {}
    to_train: dict[int, tuple[str, list[int]]] = {}
    for fold in fold_numbers:
        speakers = tapt_speakers(fold, protocol)
        key = tapt_key(base_model, speakers, features_dir, settings)
        fold_dir = storage.join(storage.absolute(out_dir), f"fold_{fold}", key)
        if storage.exists(storage.join(fold_dir, "model", "model.safetensors")):
            log.info("TAPT fold %d: cached in %s", fold, fold_dir)
            models[fold] = storage.join(fold_dir, "model")
        else:
            to_train[fold] = (fold_dir, speakers)
    if not to_train:
        return models
    progress = Queue(actor_options={"num_cpus": 0})  # the folds' epoch reports, to print
    # RAY: a token CPU, the trainer does the work (ser_ray.distributed.resources)
    task = ray.remote(num_cpus=TAPT_TASK_CPUS)(fit_pretraining)
    pending = {
        fold: task.remote(
            features_dir,
            fold_dir,
            settings,
            speakers=speakers,
            use_gpu=resources["use_gpu"],
            resources_per_worker=resources["resources_per_worker"],
            max_failures=max_failures,
            on_report=functools.partial(_put_tagged, progress, fold),
        )
        for fold, (fold_dir, speakers) in to_train.items()
    }
    log.info("TAPT: folds %s pre-training concurrently", sorted(pending))
    fold_of = {ref: fold for fold, ref in pending.items()}
    printers = {
        fold: console.pretrain_progress(f"TAPT fold {fold}", settings.epochs) for fold in pending
    }
    waiting = list(fold_of)
    while waiting:  # progress lines while the folds run, a line per fold as it finishes
        done, waiting = ray.wait(waiting, num_returns=1, timeout=PROGRESS_POLL_S)
        while not progress.empty():
            fold, report = progress.get_nowait()
            printers[fold](report)
        for ref in done:
            model_dir = ray.get(ref)
            models[fold_of[ref]] = model_dir
            result_json = storage.join(storage.parent(model_dir), RESULT_FILE)
            log.info("TAPT fold %d: %s", fold_of[ref], _loss_line(result_json))
    ray.kill(progress.actor)
    return models


def _put_tagged(queue, fold: int, report: dict[str, Any]) -> None:
    """A TAPT task's report handler: the fold's report onto the driver's queue (RAY)."""
    queue.put((fold, report))


def _loss_line(result_json: str) -> str:
    """'contrastive 3.94 -> 3.21 over 10 epochs, 412 s' from a pre-training run's history."""
    history = json.loads(storage.read_text(result_json))["history"]
    first, last = history[0], history[-1]
    seconds = sum(row.get("pretrain/epoch_s", 0.0) for row in history)
    return (
        f"contrastive {first['pretrain/contrastive']:.3f} -> {last['pretrain/contrastive']:.3f} "
        f"over {last['epoch']} epochs, {seconds:.0f} s"
    )
