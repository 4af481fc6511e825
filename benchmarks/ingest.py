"""Benchmark: a training worker's peak memory, whole split in memory vs streamed by Ray Data.

- ``memory``: the worker reads its whole split (``read_split`` + ``table_from_arrow``), as
  fine-tuning did before streaming (the in-process AdamW sweep still does);
- ``stream``: the split arrives through Ray Data (``datasets=`` + ``get_dataset_shard``),
  ``--window-clips`` clips at a time (:mod:`ser_ray.distributed.ingest`).

Each runs in a one-worker ``TorchTrainer`` over one epoch of training batches (collated, no
model, so the figure is the data's), on a features Parquet repeated ``--copies`` times (the
same clips under other paths: a corpus that many times larger). The same for pre-training
(figures prefixed ``pretrain_``): a TAPT worker's pool (the fold's training speakers) read
whole (``read_pool``, as pre-training did before streaming) or streamed, one epoch of
:func:`ser_ray.training.pretrain.epoch_batches`. Figures: the worker's peak private memory (RSS less
shared pages) and peak RSS above their values when the function started, sampled every
10 ms, in MB; growth = peak private memory at the largest size over the smallest.

Run it as ``python jobs/benchmark.py ingest [--features DIR] [--copies 1 4]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ser_ray.corpus.protocol import ravdess_protocol
from ser_ray.distributed import prepare

log = logging.getLogger(__name__)
PATHS = ("memory", "stream")
TRAININGS = ("finetune", "pretrain")  # the fine-tuning worker's split; the TAPT worker's pool
RESULT_FILE = "ingest.json"


def add_ingest_args(parser: argparse.ArgumentParser) -> None:
    """The ingest benchmark's own flags (the caller adds --out, --smoke-test, …)."""
    parser.add_argument(
        "--features",
        default=None,
        help="prepared features folder (default: the demo corpus, prepared into OUT/prepared)",
    )
    parser.add_argument(
        "--copies",
        type=int,
        nargs="+",
        default=[1, 4],
        help="corpus sizes, as copies of the features (default: %(default)s)",
    )
    parser.add_argument("--fold", type=int, default=1, help="outer fold (default: %(default)s)")
    parser.add_argument(
        "--window-clips", type=int, default=128, help="clips a streaming worker holds"
    )
    parser.add_argument("--batch-size", type=int, default=8)


def _repeated(features_dir: Path, copies: int, out: Path) -> Path:
    """A features folder holding every clip of ``features_dir`` ``copies`` times."""
    from ser_ray.distributed.ingest import split_columns

    target = out / f"features_x{copies}"
    if (target / "_SUCCESS").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    files = sorted(str(f) for f in features_dir.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=split_columns("waveform")) for f in files)
    for k in range(copies):
        paths = pc.binary_join_element_wise(pa.scalar(f"/copy{k}"), table.column("path"), "")
        pq.write_table(table.set_column(0, "path", paths), target / f"part-{k:06d}.parquet")
    (target / "_SUCCESS").write_text("")
    return target


class _PeakMemory:
    """Highest RSS, and highest private memory (RSS less shared pages: Ray's object store is
    mapped into the worker, so its pages count in RSS), of this process while in the
    ``with`` block, sampled every 10 ms."""

    def __enter__(self) -> _PeakMemory:
        import psutil

        self._process = psutil.Process()
        self.start_rss, self.start_private = self._read()
        self.peak_rss, self.peak_private = self.start_rss, self.start_private
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> tuple[int, int]:
        info = self._process.memory_info()
        return info.rss, info.rss - info.shared

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._update()

    def _update(self) -> None:
        rss, private = self._read()
        self.peak_rss, self.peak_private = max(self.peak_rss, rss), max(self.peak_private, private)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()

    def figures(self) -> dict[str, float]:
        """Peaks above the start, MB."""
        return {
            "peak_private_mb": (self.peak_private - self.start_private) / 2**20,
            "peak_rss_mb": (self.peak_rss - self.start_rss) / 2**20,
        }


def _ingest_worker(config: dict[str, Any]) -> None:
    """One epoch of training batches of ``config["training"]``, by the ``memory`` or
    ``stream`` path (RAY)."""
    import pyarrow.dataset  # noqa: F401 - imported before measuring, like the model would be
    import ray.data  # noqa: F401

    from ser_ray.distributed.train_edge import report
    from ser_ray.models.ssl import demo_feature_extractor

    epoch_batches = _pretrain_batches if config["training"] == "pretrain" else _finetune_batches
    fe = demo_feature_extractor()
    with _PeakMemory() as memory:
        t0 = time.perf_counter()
        batches = sum(1 for _ in epoch_batches(config, fe))
        seconds = time.perf_counter() - t0
    metrics = {**memory.figures(), "batches": batches, "seconds": seconds}
    report(metrics, lambda out: (out / RESULT_FILE).write_text(json.dumps(metrics)))


def _finetune_batches(config: dict[str, Any], fe) -> Iterator[Any]:
    """A fine-tuning worker's collated batches of its split, held whole or streamed (RAY)."""
    from ser_ray.distributed.ingest import worker_stream
    from ser_ray.training.clip_data import collated_batches, read_split, table_from_arrow

    to_clips = functools.partial(
        table_from_arrow,
        kind="waveform",
        label_index=ravdess_protocol().label_index(),
        feature_extractor=fe,
    )
    if config["path"] == "memory":
        clips = to_clips(read_split(config["source"], config["actors"], config["columns"]))
    else:
        clips = worker_stream("train", config["num_clips"], to_clips, config["window_clips"])
    return collated_batches(clips, config["batch_size"], seed=0, epoch=0)


def _pretrain_batches(config: dict[str, Any], fe) -> Iterator[Any]:
    """A TAPT worker's micro-batches of its pool, held whole or streamed (RAY)."""
    from ser_ray.distributed.ingest import worker_stream
    from ser_ray.distributed.pretrain_trainer import POOL_DATASET
    from ser_ray.features.unlabeled import clips_from_arrow, read_pool
    from ser_ray.training.pretrain import PretrainConfig, epoch_batches

    cfg = PretrainConfig(batch_size=config["batch_size"], window_clips=config["window_clips"])
    if config["path"] == "memory":
        clips = read_pool(config["source"], config["actors"])
    else:
        clips = worker_stream(POOL_DATASET, config["num_clips"], clips_from_arrow, cfg.window_clips)
    return epoch_batches(clips, cfg, fe, epoch=0)


def _training_inputs(training: str, source: str, fold: int) -> dict[str, Any]:
    """What a worker of ``training`` reads (speakers, columns, clip count) and the trainer's
    dataset of it (RAY), on fold ``fold``'s training side."""
    from ser_ray.distributed.ingest import parquet_dataset, split_columns
    from ser_ray.distributed.pretrain_trainer import POOL_DATASET
    from ser_ray.distributed.tapt import tapt_speakers
    from ser_ray.features.unlabeled import POOL_COLUMNS
    from ser_ray.training.clip_data import count_split

    if training == "pretrain":
        speakers = tapt_speakers(fold, ravdess_protocol())
        columns, name = POOL_COLUMNS, POOL_DATASET
    else:
        speakers, columns, name = (
            ravdess_protocol().split(fold)[1],
            split_columns("waveform"),
            "train",
        )
    return {
        "actors": speakers,
        "columns": columns,
        "num_clips": count_split(source, speakers),
        "datasets": {name: parquet_dataset(source, columns, speakers)},
    }


def run_ingest_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from ser_ray.distributed.ingest import data_config
    from ser_ray.distributed.train_edge import build_torch_trainer

    out = Path(args.out or "runs/benchmark").resolve() / "ingest"
    features_dir = args.features
    if features_dir is None:
        features_dir = prepare.prepare_demo(out / "prepared", smoke_test=args.smoke_test)
    figures: dict[str, Any] = {"window_clips": args.window_clips, "fold": args.fold}
    for training, copies in itertools.product(TRAININGS, args.copies):
        prefix = "pretrain_" if training == "pretrain" else ""
        source = str(_repeated(Path(features_dir).resolve(), copies, out))
        inputs = _training_inputs(training, source, args.fold)
        figures[f"{prefix}x{copies}_clips"] = inputs["num_clips"]
        for path in PATHS:
            config = {
                "training": training,
                "path": path,
                "source": source,
                "window_clips": args.window_clips,
                "batch_size": args.batch_size,
                **{k: inputs[k] for k in ("actors", "columns", "num_clips")},
            }
            streamed = path == "stream"
            trainer = build_torch_trainer(
                _ingest_worker,
                config,
                storage_path=out / "ray",
                name=f"{training}_{path}_x{copies}",
                resources_per_worker={"CPU": 1},
                datasets=inputs["datasets"] if streamed else None,
                dataset_config=data_config() if streamed else None,
            )
            result = trainer.fit()  # RAY
            if result.error is not None:
                raise result.error
            with result.checkpoint.as_directory() as ckpt:
                metrics = json.loads((Path(ckpt) / RESULT_FILE).read_text())
            for key in ("peak_private_mb", "peak_rss_mb"):
                figures[f"{prefix}x{copies}_{path}_{key}"] = round(metrics[key], 1)
            figures[f"{prefix}x{copies}_{path}_s"] = round(metrics["seconds"], 2)
            log.info("%s %s x%d: %s", training, path, copies, metrics)
    first, last = args.copies[0], args.copies[-1]
    for prefix, path in itertools.product(("", "pretrain_"), PATHS):
        small = figures[f"{prefix}x{first}_{path}_peak_private_mb"]
        large = figures[f"{prefix}x{last}_{path}_peak_private_mb"]
        figures[f"{prefix}{path}_growth_x{last}_over_x{first}"] = large / max(small, 1e-9)
    return figures
