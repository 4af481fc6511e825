"""Where the project's files live and how its Parquet folders are read.

One place turns a local path or a URI (``s3://``, ``gs://``, …) into a pyarrow filesystem
and a path inside it (:func:`filesystem_of`), lists a Parquet folder's files
(:func:`parquet_files`), opens it as a pyarrow dataset with the filter that keeps some
actors' rows (:func:`actor_rows`, :func:`count_rows`), and reads list<float32> columns as
numpy arrays (:func:`list_column`). Every reader of a features, feature-cache or pool
folder goes through these.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    import pyarrow.dataset as pads


def filesystem_of(source: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI (``scheme://…``) or a local path (made
    absolute)."""
    text = str(source)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def uri_prefix(source: str | os.PathLike) -> str:
    """What turns a path inside :func:`filesystem_of`'s filesystem back into a URI:
    ``"s3://"`` for ``s3://bucket/x``, ``""`` for a local path."""
    text = str(source)
    return text.split("://", 1)[0] + "://" if "://" in text else ""


def _hidden(path: str, folder: str) -> bool:
    """Whether a file or folder on ``path`` under ``folder`` starts with '.' or '_' (skipped,
    as pyarrow's datasets skip them when they count rows)."""
    return any(part[:1] in (".", "_") for part in path[len(folder) :].split("/") if part)


def parquet_files(folder: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, its ``.parquet`` files under ``folder`` in name order): local or URI,
    recursive, hidden files and folders ('.' or '_') left out; the list may be empty."""
    filesystem, root = filesystem_of(folder)
    files = sorted(
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.is_file and info.path.endswith(".parquet") and not _hidden(info.path, root)
    )
    return filesystem, files


def actor_rows(
    folder: str | os.PathLike,
    actors: Sequence[int] | None,
    *,
    labels: Sequence[str] | None = None,
    exclude_invalid_files: bool = False,
) -> tuple[pads.Dataset, pads.Expression | None]:
    """(pyarrow dataset of a Parquet folder, local or URI; the filter that keeps the rows of
    ``actors`` and of ``labels`` (the ``emotion`` column), each None for all, or None for all
    rows). ``exclude_invalid_files`` skips files that are not Parquet (e.g. a pool's
    ``rejected.csv``), at the cost of opening every file."""
    import pyarrow.dataset as pads

    filesystem, path = filesystem_of(folder)
    dataset = pads.dataset(
        path, format="parquet", filesystem=filesystem, exclude_invalid_files=exclude_invalid_files
    )
    keep = None
    if actors is not None:
        keep = pads.field("actor").isin([int(a) for a in actors])
    if labels is not None:
        of_labels = pads.field("emotion").isin([str(label) for label in labels])
        keep = of_labels if keep is None else keep & of_labels
    return dataset, keep


def count_rows(
    folder: str | os.PathLike,
    actors: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
) -> int:
    """How many rows (of ``actors`` and ``labels``; all when None) a Parquet folder holds
    (from the files' metadata, or those columns only)."""
    dataset, keep = actor_rows(folder, actors, labels=labels)
    return dataset.count_rows(filter=keep)


def list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<float32> column as float32 numpy arrays (no Python floats in between)."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # pyarrow may keep one chunk
        column = column.chunk(0) if column.num_chunks else pa.array([], column.type)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
