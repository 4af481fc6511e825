"""The Ray Train edge of self-supervised pre-training: a ``TorchTrainer`` over a pool.

:func:`pretrain_per_worker` is the per-worker function: the pool streams in through Ray Data,
``window_clips`` clips at a time (:mod:`ser_ray.distributed.ingest`; a small pool is read once
and held in the object store for every epoch), and the Ray-free loop
:func:`ser_ray.training.pretrain.run_pretraining` trains on it; :func:`fit_pretraining` is the
driver that builds the trainer, fits it and copies the checkpoint out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ser_ray.common import storage
from ser_ray.distributed import ingest as ray_ingest
from ser_ray.distributed import train_edge as edge
from ser_ray.features.unlabeled import POOL_COLUMNS, clips_from_arrow, pool_paths
from ser_ray.training import engine as eng
from ser_ray.training.pretrain import (
    CLIPS_FILE,
    MODEL_DIR,
    RESULT_FILE,
    PretrainConfig,
    build_pretraining_model,
    run_pretraining,
)

POOL_DATASET = "pool"  # the trainer's Ray dataset of the pool's clips


def pretrain_per_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: pre-train on the trainer's dataset ``pool``.

    ``config``: :class:`PretrainConfig` fields plus ``num_clips`` (the pool's size, counted by
    :func:`fit_pretraining`), ``log_dir`` and ``torch_threads`` (None: one per reserved CPU).
    The pool streams in ``window_clips`` clips at a time. Reports ``pretrain/*`` every epoch
    with a checkpoint; resumes from the latest one.
    """
    cfg = PretrainConfig.from_dict(config)
    ctx = edge.worker_context(config.get("torch_threads"))
    eng.seed_everything(cfg.seed)
    model, fe = build_pretraining_model(cfg)
    eng.seed_everything(cfg.seed, ctx.rank)  # other masks and negatives per rank
    clips = ray_ingest.worker_stream(  # RAY
        POOL_DATASET, config["num_clips"], clips_from_arrow, cfg.window_clips
    )
    checkpoint = edge.latest_checkpoint()
    with contextlib.ExitStack() as stack:
        log_dir = config.get("log_dir")
        if log_dir is not None and ctx.rank == 0:  # on a URI: uploaded when the run ends
            log_dir = str(stack.enter_context(storage.staged(log_dir)))
        resume_dir = None
        if checkpoint is not None:
            resume_dir = stack.enter_context(checkpoint.as_directory())
        outcome = run_pretraining(
            cfg,
            model,
            fe,
            clips,
            device=ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
            wrap_model=lambda m: edge.wrap_ddp(m, ctx.world_size),
            resume_from=resume_dir,
            on_epoch_end=lambda metrics, write: edge.report(metrics, write, ctx.rank),
            log_dir=log_dir,
        )
    edge.report({"final": True, "step": outcome.step}, outcome.write_checkpoint, ctx.rank)


def fit_pretraining(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PretrainConfig,
    *,
    speakers: list[int] | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    max_failures: int = 2,
    storage_path: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    torch_threads: int | None = None,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Pre-train on a pool (:mod:`ser_ray.features.unlabeled`; with ``speakers``, only their clips)
    with a ``TorchTrainer`` whose workers stream the pool from a Ray dataset; returns the
    location ``out_dir/model`` (the HF checkpoint; ``out_dir`` local or a URI). ``out_dir``
    also gets ``result.json`` (history,
    settings) and ``clips.csv``. Re-running with the same ``out_dir`` resumes. Torch runs on
    ``torch_threads`` threads per worker (default: one per reserved CPU). ``on_report`` gets
    every epoch's report (``epoch``, ``pretrain/*``) in the calling process as it comes
    (:func:`ser_ray.distributed.train_edge.fit_with_reports`), e.g. to print progress."""
    out = storage.absolute(out_dir)
    source = storage.absolute(source)
    paths = pool_paths(source, speakers)  # the pool's size sets the steps of an epoch
    if not paths:
        chosen = "all speakers" if speakers is None else f"speakers {list(speakers)}"
        raise ValueError(f"{source}: no clips to pre-train on ({chosen})")
    # RAY. Read here and held for every epoch when small (the demo pool: 40 epochs), so no
    # read task, and no new Ray worker process, starts for it.
    pool = {POOL_DATASET: ray_ingest.source_dataset(source, POOL_COLUMNS, speakers)}
    config = {
        **cfg.to_dict(),
        "num_clips": len(paths),
        "log_dir": str(log_dir or storage.join(out, "tensorboard")),
        "torch_threads": torch_threads,
    }

    def build(callbacks: list):
        return edge.build_torch_trainer(
            pretrain_per_worker,
            config,
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources_per_worker,
            storage_path=storage_path or storage.join(out, "ray"),
            name="pretrain",
            max_failures=max_failures,
            callbacks=callbacks,
            datasets=pool,
            dataset_config=ray_ingest.data_config(),
        )

    what = f"pre-training into {out}"
    if on_report is None:
        checkpoint = edge.fit(build([]), what)  # RAY
    else:
        checkpoint = edge.final_checkpoint(edge.fit_with_reports(build, on_report), what)
    model_dir = storage.join(out, MODEL_DIR)
    storage.delete(model_dir)
    with checkpoint.as_directory() as ckpt:
        storage.upload(Path(ckpt) / MODEL_DIR, model_dir)
        storage.write_bytes(storage.join(out, RESULT_FILE), (Path(ckpt) / RESULT_FILE).read_bytes())
    storage.write_text(storage.join(out, CLIPS_FILE), "".join(f"{p}\n" for p in paths))
    return model_dir
