"""Clips in a worker's memory and how they are batched (no Ray).

Read top to bottom: :class:`ClipArrays` (a window of clips, sorted by path; a whole split in
memory is one window, a :class:`ser_ray.training.clip_stream.ClipStream` streams them),
:class:`Clips` (what the loops pass over window by window), :func:`read_split` and
:func:`count_split` (one split's rows, or their number, from a features or feature-cache
Parquet folder), :func:`table_from_arrow` (rows as a :class:`ClipArrays`),
:func:`merge_tables`, :func:`length_grouped_batches` (shuffled batches of similar lengths,
one share per DDP rank), :func:`collate` (dynamic padding into model keyword arguments),
:func:`collated_batches`, :func:`window_batches` and :func:`batches_per_epoch` (an epoch's
batches, window by window) and :func:`predictions_frame` (per-clip probabilities in the
``predictions.csv`` format).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from ser_ray.common import predictions, storage
from ser_ray.common.storage import list_column
from ser_ray.models.ssl import pad_waveforms, prepare_waveform

#: What a worker holds per clip: a waveform, the frozen CNN's output, or pooled layers.
INPUT_KINDS = ("waveform", "cnn", "pooled")
MODEL_NAME = "wav2vec2"  # the model column of predictions.csv when no variant names it


@dataclasses.dataclass
class ClipArrays:
    """Clips held in a worker's memory as arrays, sorted by path (a deterministic order);
    the corpus's own table of clips (paths, speakers, labels) is
    :class:`ser_ray.corpus.clips.ClipTable`.

    ``inputs[i]`` is a prepared waveform (S,), CNN features (T, C) or pooled layer states
    (K, H), by ``kind`` (a fold's ``input_kind``).
    """

    kind: str
    paths: list[str]
    speakers: np.ndarray
    emotions: list[str]
    labels: np.ndarray
    inputs: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([x.shape[0] for x in self.inputs], dtype=np.int64)

    @property
    def window_clips(self) -> int:
        return max(1, len(self))

    def windows(self) -> Iterator[ClipArrays]:
        """All clips as one window (the in-memory case of :class:`Clips`)."""
        yield self

    def without_inputs(self) -> ClipArrays:
        """Paths, speakers and labels only (what predictions.csv needs)."""
        return dataclasses.replace(self, inputs=[])


WindowT = TypeVar("WindowT", covariant=True)


class Clips(Protocol[WindowT]):
    """Clips a loop passes over window by window: a :class:`ClipArrays` (one window) or a
    :class:`ser_ray.training.clip_stream.ClipStream` (bounded windows read from Ray Data); a window
    has ``lengths`` (pre-training's windows are
    :class:`ser_ray.features.unlabeled.UnlabeledClips`)."""

    @property
    def window_clips(self) -> int: ...

    def __len__(self) -> int: ...

    def windows(self) -> Iterator[WindowT]: ...


def read_split(
    source_dir: str | os.PathLike,
    speakers: Sequence[int],
    columns: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> pa.Table:
    """The rows of ``speakers`` (and of ``labels``, unless None) from a features or
    feature-cache Parquet folder, in memory (predicate pushdown on ``actor``): the reference
    the benchmarks and tests compare the streamed splits with (training streams,
    :mod:`ser_ray.distributed.ingest`)."""
    dataset, keep = storage.speaker_rows(source_dir, speakers, labels=labels)
    return dataset.to_table(columns=list(columns) if columns else None, filter=keep)


def count_split(
    source_dir: str | os.PathLike, speakers: Sequence[int], labels: Sequence[str] | None = None
) -> int:
    """How many rows of ``speakers`` (and ``labels``, unless None) a features or feature-cache
    folder holds (those columns only are read)."""
    return storage.count_rows(source_dir, speakers, labels)


def count_classes(
    source_dir: str | os.PathLike, speakers: Sequence[int], label_index: Mapping[str, int]
) -> list[int]:
    """Rows of ``speakers`` per class index (``label_index``: corpus label -> class; labels it
    does not name are not counted) in a features or feature-cache folder, read from the
    ``emotion`` column alone: the counts that set a fold's class weights before any worker
    reads a clip."""
    counts = [0] * (max(label_index.values(), default=-1) + 1)
    if not speakers:
        return counts
    table = read_split(source_dir, speakers, columns=["emotion"], labels=list(label_index))
    for label in table.column("emotion").to_pylist():
        counts[label_index[label]] += 1
    return counts


def table_from_arrow(
    table: pa.Table,
    kind: str,
    label_index: Mapping[str, int],
    feature_extractor=None,
) -> ClipArrays:
    """Clips from a features table (``waveform`` column) or a feature cache (``features``),
    labelled by ``label_index`` (corpus label -> class index:
    :meth:`ser_ray.corpus.protocol.Protocol.label_index`).

    Waveforms are prepared per clip (feature extractor's normalisation) once, here.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    if table.num_rows == 0:
        return ClipArrays(kind, [], np.zeros(0, np.int64), [], np.zeros(0, np.int64), [])
    order = np.argsort(np.array(table.column("path").to_pylist(), dtype=object), kind="stable")
    table = table.take(pa.array(order))
    paths = table.column("path").to_pylist()
    emotions = table.column("emotion").to_pylist()
    if kind == "waveform":
        if feature_extractor is None:
            raise ValueError("waveforms need the feature extractor (normalisation)")
        inputs = [prepare_waveform(w, feature_extractor) for w in list_column(table, "waveform")]
    else:
        rows = table.column("feature_rows").to_numpy()
        dims = table.column("feature_dim").to_numpy()
        inputs = [
            x.reshape(int(r), int(d))
            for x, r, d in zip(list_column(table, "features"), rows, dims, strict=True)
        ]
    unknown = sorted(set(emotions) - set(label_index))
    if unknown:
        raise ValueError(f"labels {unknown} have no class; known: {sorted(label_index)}")
    labels = np.array([label_index[e] for e in emotions], dtype=np.int64)
    return ClipArrays(
        kind=kind,
        paths=paths,
        speakers=table.column("actor").to_numpy().astype(np.int64),
        emotions=emotions,
        labels=labels,
        inputs=inputs,
    )


def merge_tables(*tables: ClipArrays) -> ClipArrays:
    """The clips of all tables (same kind), sorted by path like every :class:`ClipArrays`."""
    kinds = sorted({t.kind for t in tables})
    if len(kinds) != 1:
        raise ValueError(f"cannot merge clips of kinds {kinds}")
    paths = [p for t in tables for p in t.paths]
    order = np.argsort(np.array(paths, dtype=object), kind="stable")
    emotions = [e for t in tables for e in t.emotions]
    inputs = [x for t in tables for x in t.inputs]
    return ClipArrays(
        kind=kinds[0],
        paths=[paths[i] for i in order],
        speakers=np.concatenate([t.speakers for t in tables])[order],
        emotions=[emotions[i] for i in order],
        labels=np.concatenate([t.labels for t in tables])[order],
        inputs=[inputs[i] for i in order] if inputs else [],
    )


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    group_factor: int = 50,
    window: int = 0,
) -> list[list[int]]:
    """Shuffled batches of clips of similar length, this rank's share (equal for every rank).

    Shuffle with an RNG seeded by ``(seed, epoch, window)`` (``window`` 0 draws what
    ``(seed, epoch)`` draws), sort each group of ``batch_size * group_factor`` clips by
    length, cut it into batches, shuffle the batches; rank ``r`` takes batches
    ``r, r + world_size, ...`` (the remainder is dropped so that every rank runs the same
    number of steps, none when there are fewer batches than ranks, as in a small last
    window). ``window``: the index of a streamed window (:func:`window_batches`).
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch, window])
    order = rng.permutation(len(lengths))
    group = batch_size * max(1, group_factor)
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = order[start : start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world_size
    return batches[rank::world_size][:per_rank]


def collate(
    table: ClipArrays, indices: Sequence[int], device: torch.device | str = "cpu", padding_value=0.0
) -> dict[str, torch.Tensor]:
    """Model keyword arguments for the clips ``indices`` (dynamic padding to the longest)."""
    items = [table.inputs[i] for i in indices]
    if table.kind == "waveform":
        values, lengths = pad_waveforms(items, padding_value)
        batch = {"input_values": values, "lengths": lengths}
    elif table.kind == "cnn":
        feats = nn.utils.rnn.pad_sequence([torch.tensor(x) for x in items], batch_first=True)
        frames = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        batch = {"cnn_features": feats, "frame_lengths": frames}
    else:
        batch = {"pooled_layers": torch.from_numpy(np.stack(items))}
    batch["labels"] = torch.from_numpy(table.labels[list(indices)])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def collated_batches(
    clips: Clips[ClipArrays],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    group_factor: int = 50,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch's batches of this rank, collated on the CPU (:func:`window_batches`)."""
    return window_batches(
        clips, collate, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
        group_factor=group_factor,
    )  # fmt: skip


BatchT = TypeVar("BatchT")


def window_batches(
    clips: Clips,
    take: Callable[[Any, list[int]], BatchT],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    group_factor: int = 50,
) -> Iterator[BatchT]:
    """One epoch's batches of this rank, window by window: within each window the batches of
    :func:`length_grouped_batches`, seeded by (seed, epoch, window index), each handed out as
    ``take(window, indices)``. With one window (clips held whole), exactly that function's
    batches.

    A window is dropped before the next one is read, so at most one window of clips is held
    (``take`` must return the batch's own data, not the window).
    """
    windows = clips.windows()
    for index in itertools.count():
        table = next(windows, None)
        if table is None:
            return
        share = length_grouped_batches(
            table.lengths, batch_size, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, group_factor=group_factor, window=index,
        )  # fmt: skip
        for indices in share:
            yield take(table, indices)
        del table  # before the next window is read


def batches_per_epoch(
    clips: Clips, batch_size: int, *, world_size: int = 1, group_factor: int = 50
) -> int:
    """How many batches :func:`window_batches` gives each rank per epoch (from the clip
    count and the window size alone: no clip is read)."""
    group = batch_size * max(1, group_factor)
    total = 0
    for start in range(0, len(clips), clips.window_clips):
        size = min(clips.window_clips, len(clips) - start)
        batches = sum(math.ceil(min(group, size - g) / batch_size) for g in range(0, size, group))
        total += batches // world_size
    if total == 0:
        raise ValueError(f"{len(clips)} clips make fewer batches than {world_size} workers")
    return total


def predictions_frame(
    table: ClipArrays,
    probs: np.ndarray,
    class_names: Sequence[str],
    fold: int | None,
    model_name: str = MODEL_NAME,
) -> pd.DataFrame:
    """The clips of ``table`` in the predictions.csv format
    (:func:`ser_ray.common.predictions.predictions_frame`; probabilities renormalised so that
    every row sums to 1)."""
    names = list(class_names)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    columns = {
        "path": table.paths,
        "actor": table.speakers.astype(int),
        "fold": fold,
        "true_label": [names[i] for i in table.labels],
        "pred_label": predictions.argmax_labels(probs, names),
        "model": model_name,
    }
    return predictions.predictions_frame(columns, probs, names)
