"""The Ray Data edge of training: clips streamed into the Ray Train workers.

Driver side (where a fold's ``TorchTrainer`` is built,
:func:`ser_ray.distributed.fold_trainer.build_fold_trainer`): :func:`fold_datasets` makes one Ray
dataset per split (``train``, ``val``, ``test``) with :func:`parquet_dataset`: the features or
feature-cache folder's rows of the split's speakers, only the columns the worker needs
(pre-training's pool is one such dataset,
:func:`ser_ray.distributed.pretrain_trainer.fit_pretraining`);
:func:`data_config` says how they reach the workers. Worker side: :func:`worker_stream` wraps
``ray.train.get_dataset_shard(name)`` in a :class:`~ser_ray.training.clip_stream.ClipStream`
(:func:`shard_stream`), so a worker holds one window of clips at a time. A fold that trains
in its Tune trial, and an AdamW trial, read the same datasets themselves through
:func:`local_shards`, the iterators ``data_config`` would give a one-worker trainer, so they
get the same rows in the same order.

Choices:

- **Read once or per pass**: a source of at most :data:`HOLD_MAX_BYTES` is read once, in
  the process that builds the trainer (a fold's Tune trial, the pre-training driver), and
  held in the object store (:func:`source_dataset`): no read task and no new Ray worker
  process starts for it, at the start or in any epoch (a Ray Data execution per epoch and
  split started 50 new processes on a default run; one per fold to read the held splits
  still raised the raylet's worker-count warnings). Larger sources are read by Ray Data
  again on each pass (:func:`parquet_dataset`) and never held whole.
- **Order**: ``preserve_order`` makes every pass give the rows in the same order, so batches
  depend on the seed only (windows are cut from the stream, shuffled within).
- **No split across DDP ranks** (``datasets_to_split=[]``): every rank streams the whole
  split and takes its share of each window's batches, as the in-memory path does.
  ``streaming_split`` hands blocks to whichever rank asks first, so which clips a rank saw
  would depend on timing, not on the seed.
- **Resources**: six folds train at once on a small machine, their workers holding nearly
  all CPUs, so a read task that asks for a CPU could wait for ever, and Ray Data's Parquet
  readers ask for CPUs before any row is read. :func:`parquet_dataset` lists the files in
  the driver and reads each in a map task that reserves none, one at a time per dataset
  (:data:`ser_ray.distributed.resources.READ_TASK_CPUS` and ``READ_CONCURRENCY``; the
  reasons are in :mod:`ser_ray.distributed.resources`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ser_ray.common.storage import parquet_files
from ser_ray.distributed import console
from ser_ray.distributed.resources import READ_CONCURRENCY, READ_TASK_CPUS
from ser_ray.training.clip_stream import ClipStream, WindowT

if TYPE_CHECKING:
    import ray.data
    import ray.train

ROWS_PER_READ = 16  # rows per batch handed from Ray Data to the worker's window
#: A source of at most this many bytes (uncompressed Parquet) is read once per fold and held
#: in the object store for every epoch; a larger one is read again on every pass.
HOLD_MAX_BYTES = 1 << 30


def split_columns(kind: str) -> list[str]:
    """The columns a worker needs from a features (``waveform``) or feature-cache source."""
    inputs = ["waveform"] if kind == "waveform" else ["feature_rows", "feature_dim", "features"]
    return ["path", "actor", "emotion", *inputs]


def fold_datasets(
    source: str | os.PathLike,
    split_speakers: dict[str, Sequence[int]],
    kind: str,
    labels: Sequence[str] | None = None,
) -> dict[str, ray.data.Dataset]:
    """One Ray dataset per split with speakers (RAY): the split's rows (of ``labels`` only,
    unless None), the needed columns; held when the source is small (:func:`source_dataset`)."""
    hold = parquet_bytes(source) <= HOLD_MAX_BYTES
    return {
        name: source_dataset(source, split_columns(kind), speakers, labels, hold=hold)
        for name, speakers in split_speakers.items()
        if speakers
    }


def parquet_bytes(source: str | os.PathLike) -> int:
    """Uncompressed size of a Parquet folder's rows, from the files' footers."""
    filesystem, files = parquet_files(source)
    total = 0
    for name in files:
        meta = pq.ParquetFile(name, filesystem=filesystem).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


def source_dataset(
    source: str | os.PathLike,
    columns: Sequence[str],
    speakers: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    *,
    hold: bool | None = None,
) -> ray.data.Dataset:
    """The rows of ``speakers`` and ``labels`` (all when None) of a Parquet folder, ``columns``
    only, as a Ray dataset (RAY). ``hold`` (default: the source has at most
    :data:`HOLD_MAX_BYTES`): read here, now, and held in the object store as one block
    (``ray.data.from_blocks``), so every pass iterates the held rows and no read task starts;
    else :func:`parquet_dataset`, read again on each pass. The same rows in the same order
    either way (files in name order, rows in file order)."""
    if hold is None:
        hold = parquet_bytes(source) <= HOLD_MAX_BYTES
    speakers = None if speakers is None else [int(a) for a in speakers]
    labels = None if labels is None else [str(label) for label in labels]
    if not hold:
        return parquet_dataset(source, columns, speakers, labels)
    import ray.data

    filesystem, files = parquet_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no Parquet files")
    listing = pa.table({"file": files})
    tables = list(_read_files(listing, filesystem, list(columns), speakers, labels))
    if not tables:  # nothing to hold: the lazy dataset reads the same (no) rows
        return parquet_dataset(source, columns, speakers, labels)
    # one block, its metadata taken here: from_arrow would start a task (in a new Ray worker
    # process) for each block's metadata
    return ray.data.from_blocks([pa.concat_tables(tables)])


def parquet_dataset(
    source: str | os.PathLike,
    columns: Sequence[str],
    speakers: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
) -> ray.data.Dataset:
    """The rows of ``speakers`` and ``labels`` (all when None) of a Parquet folder (local or
    URI), only ``columns``, as a Ray dataset that starts even when every CPU is held (RAY;
    fine-tuning's splits, pre-training's pool, the feature cache's input; see the module
    doc).

    The files are listed here, in the driver, in name order; each is read by a map task that
    reserves no CPU, one task at a time, with the speaker filter and the columns pushed into
    the read. No progress bars or start-of-execution lines (six folds x epochs x splits of
    them otherwise)."""
    import ray.data

    filesystem, files = parquet_files(source)
    if not files:
        raise FileNotFoundError(f"{source}: no Parquet files")
    listing = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    console.quiet_dataset(listing)
    return listing.map_batches(
        _read_files,
        fn_kwargs={
            "filesystem": filesystem,
            "columns": list(columns),
            "speakers": None if speakers is None else [int(a) for a in speakers],
            "labels": None if labels is None else [str(label) for label in labels],
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=READ_CONCURRENCY),
    )


def _read_files(
    batch: pa.Table,
    filesystem,
    columns: list[str],
    speakers: list[int] | None,
    labels: list[str] | None = None,
) -> Iterator[pa.Table]:
    """The rows of ``speakers`` and ``labels`` in the files of ``batch``, ``columns`` only, a
    few rows at a time (a task holds one Parquet row group, not a whole file)."""
    read = sorted({*columns, *(["actor"] if speakers else []), *(["emotion"] if labels else [])})
    for name in batch.column("file").to_pylist():
        parquet = pq.ParquetFile(name, filesystem=filesystem)
        for rows in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=read):
            table = pa.Table.from_batches([rows])
            if speakers is not None:
                table = table.filter(pc.is_in(table.column("actor"), pa.array(speakers)))
            if labels is not None:
                table = table.filter(pc.is_in(table.column("emotion"), pa.array(labels)))
            if table.num_rows:
                yield table.select(columns)


def data_config() -> ray.train.DataConfig:
    """How the datasets reach the workers (RAY): whole to every rank, in the same order on
    every pass."""
    import ray.train
    from ray.data import ExecutionOptions

    options = ExecutionOptions(preserve_order=True)
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def local_shards(datasets: dict[str, ray.data.Dataset]) -> dict[str, ray.data.DataIterator]:
    """The iterators a Train worker of a one-worker ``TorchTrainer`` gets from
    :func:`data_config` (RAY), for a process that reads the datasets itself (a fold's or an
    AdamW sweep's Tune trial): the same rows in the same order, on every pass."""
    return data_config().configure(
        datasets, world_size=1, worker_handles=None, worker_node_ids=None
    )[0]


def shard_stream(
    shard: ray.data.DataIterator,
    num_clips: int,
    to_clips: Callable[[pa.Table], WindowT],
    window_clips: int,
) -> ClipStream[WindowT]:
    """A split's clips, ``window_clips`` at a time, from ``shard`` (a worker's
    ``get_dataset_shard`` or one of :func:`local_shards`), read :data:`ROWS_PER_READ` rows at
    a time (RAY)."""

    def open_tables():
        return shard.iter_batches(batch_size=ROWS_PER_READ, batch_format="pyarrow")

    return ClipStream(open_tables, to_clips, num_clips, window_clips)


def worker_shard(name: str) -> ray.data.DataIterator:
    """This Train worker's iterator of the trainer's dataset ``name`` (RAY:
    ``get_dataset_shard``)."""
    import ray.train

    return ray.train.get_dataset_shard(name)


def worker_stream(
    name: str,
    num_clips: int,
    to_clips: Callable[[pa.Table], WindowT],
    window_clips: int,
) -> ClipStream[WindowT]:
    """This worker's stream of split ``name`` (RAY: ``get_dataset_shard``)."""
    return shard_stream(worker_shard(name), num_clips, to_clips, window_clips)
