"""The Ray Data edge of training: clips streamed into the Ray Train workers.

Driver side (where a fold's ``TorchTrainer`` is built,
:func:`ser_ray.fold_trainer.build_fold_trainer`): :func:`fold_datasets` makes one Ray dataset
per split (``train``, ``val``, ``test``) with :func:`clip_dataset`: ``read_parquet`` of the
features or feature-cache folder, filtered on the split's actors, only the columns the worker
needs (pre-training's pool is one such dataset, :func:`ser_ray.pretrain.fit_pretraining`);
:func:`data_config` says how they reach the workers. Worker side: :func:`worker_stream` wraps
``ray.train.get_dataset_shard(name)`` in a :class:`~ser_ray.clip_stream.ClipStream`, so a
worker holds one window of clips at a time.

Choices:

- **Order**: ``preserve_order`` makes every pass give the rows in the same order, so batches
  depend on the seed only (windows are cut from the stream, shuffled within).
- **No split across DDP ranks** (``datasets_to_split=[]``): every rank streams the whole
  split and takes its share of each window's batches, as the in-memory path does.
  ``streaming_split`` hands blocks to whichever rank asks first, so which clips a rank saw
  would depend on timing, not on the seed.
- **Resources**: six folds train at once on a small machine, their workers holding nearly
  all CPUs (:func:`ser_ray.kfold.fold_resources`), and ``fit_fold`` or DDP may hold all of
  them. A read task that asks for a CPU could then wait for ever (the deadlock that once
  made workers read Parquet themselves). Ours reserve none (:data:`READ_TASK_CPUS`) and run
  one at a time per dataset (:data:`READ_CONCURRENCY`; a worker reads one split at a
  time), so they always start and take a small share of the cores while they decode.
  Ray 2.60's new Parquet reader (``use_datasource_v2``) lists files in a task that always
  asks for one CPU, which 2 CPUs shared by six folds never have free: the datasets use the
  classic reader (files listed where the dataset is built, filter and columns pushed into
  the read tasks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ser_ray.clip_stream import ClipStream, WindowT

if TYPE_CHECKING:
    import ray.data
    import ray.train

SPLITS = ("train", "val", "test")
READ_TASK_CPUS = 0  # logical CPUs a Parquet read task reserves: none, so it never waits
READ_CONCURRENCY = 1  # read tasks at once per dataset
ROWS_PER_READ = 16  # rows per batch handed from Ray Data to the worker's window


def split_columns(kind: str) -> list[str]:
    """The columns a worker needs from a features (``waveform``) or feature-cache source."""
    inputs = ["waveform"] if kind == "waveform" else ["feature_rows", "feature_dim", "features"]
    return ["path", "actor", "emotion", *inputs]


def fold_datasets(
    source: str | os.PathLike, split_actors: dict[str, Sequence[int]], kind: str
) -> dict[str, ray.data.Dataset]:
    """One Ray dataset per split with actors (RAY): the split's rows, the needed columns."""
    return {
        name: clip_dataset(source, actors, split_columns(kind))
        for name, actors in split_actors.items()
        if actors
    }


def clip_dataset(
    source: str | os.PathLike, actors: Sequence[int] | None, columns: Sequence[str]
) -> ray.data.Dataset:
    """The rows of ``actors`` (all rows when None) of a Parquet folder, only ``columns``, as
    a Ray dataset read as the module doc says (RAY; fine-tuning's splits, pre-training's
    pool)."""
    from ray.data.expressions import col

    ds = read_parquet_reserving_no_cpu(source)
    if actors is not None:
        ds = ds.filter(expr=col("actor").is_in([int(a) for a in actors]))
    return ds.select_columns(list(columns))


def read_parquet_reserving_no_cpu(source: str | os.PathLike) -> ray.data.Dataset:
    """A Parquet folder as a Ray dataset whose read tasks reserve no CPU, one at a time, with
    the classic reader (RAY; see the module doc)."""
    import ray.data

    with _quiet_classic_reader():
        return ray.data.read_parquet(
            str(source), num_cpus=READ_TASK_CPUS, concurrency=READ_CONCURRENCY
        )


def local_parquet_without_reserved_cpu(folder: Path, columns: list[str]) -> ray.data.Dataset:
    """A local Parquet folder as a Ray dataset that starts even when every CPU is held (RAY).

    Ray Data's Parquet readers first sample some files in tasks that each ask for a CPU;
    with every CPU held (e.g. by placement groups a killed trainer left behind) they wait for
    ever. Here the file list is made in the driver and each file is read by a map task that
    reserves no CPU."""
    import ray.data

    files = sorted(str(f) for f in Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet files")
    listing = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return listing.map_batches(
        _read_files,
        fn_kwargs={"columns": columns},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_TASK_CPUS,
    )


def _read_files(batch: pa.Table, columns: list[str]) -> pa.Table:
    return pa.concat_tables(
        [pq.read_table(f, columns=columns) for f in batch.column("file").to_pylist()]
    )


@contextlib.contextmanager
def _quiet_classic_reader():
    """Build datasets with the classic Parquet reader (see the module doc) and no progress
    bars or start-of-execution lines (six folds x epochs x splits of them otherwise)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    quiet = {"use_datasource_v2": False, "enable_progress_bars": False}
    quiet["print_on_execution_start"] = False
    saved = {key: getattr(context, key) for key in quiet}
    for key, value in quiet.items():
        setattr(context, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


def data_config() -> ray.train.DataConfig:
    """How the datasets reach the workers (RAY): whole to every rank, in the same order on
    every pass."""
    import ray.train
    from ray.data import ExecutionOptions

    options = ExecutionOptions(preserve_order=True)
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def worker_stream(
    name: str,
    num_clips: int,
    to_clips: Callable[[pa.Table], WindowT],
    window_clips: int,
) -> ClipStream[WindowT]:
    """This worker's stream of split ``name`` (RAY: ``get_dataset_shard``)."""
    import ray.train

    shard: Any = ray.train.get_dataset_shard(name)

    def open_tables():
        return shard.iter_batches(batch_size=ROWS_PER_READ, batch_format="pyarrow")

    return ClipStream(open_tables, to_clips, num_clips, window_clips)
