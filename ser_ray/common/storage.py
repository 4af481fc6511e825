"""Where the project's files live: the run location, local or a URI, and its Parquet folders.

A *location* is a local path or a URI that pyarrow's filesystems open (``s3://``, ``gs://``,
``abfs://``, …). On a cluster the run location (``--out``) must be one that every node
reaches — a shared mount or a URI — because tasks, actors and trials on any node read and
write it; the driver checks that before any work (:mod:`ser_ray.distributed.cluster`).

One place turns a location into a pyarrow filesystem and a path inside it
(:func:`filesystem_of`), joins, reads, writes, lists and deletes there (:func:`join`,
:func:`read_text`, :func:`write_bytes`, …), moves whole folders between a node's own disk and
a location (:func:`upload`, :func:`download`, :func:`staged`, :func:`node_local`), lists a
Parquet folder's files (:func:`parquet_files`), opens it as a pyarrow dataset with the filter
that keeps some speakers' rows (:func:`speaker_rows`, :func:`count_rows`), and reads
list<float32> columns as numpy arrays (:func:`list_column`). No code below the driver builds a
``Path`` of a run location: a URI would become a local folder named ``s3:``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
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


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI (``scheme://…``) rather than a local path."""
    return "://" in str(location)


def absolute(location: str | os.PathLike) -> str:
    """``location`` made absolute: a local path resolved, a URI as given (no trailing '/')."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(Path(text).resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/…`` for a local path or a URI (``Path`` would turn ``s3://b`` into
    ``s3:/b``)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(str(p).strip("/") for p in parts if str(p))])


def parent(location: str | os.PathLike) -> str:
    """The folder holding ``location``."""
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[0] if is_uri(text) else str(Path(text).parent)


def base_name(location: str | os.PathLike) -> str:
    """The last part of ``location`` (a file's or folder's own name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder is at ``location``."""
    filesystem, path = filesystem_of(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def make_dirs(location: str | os.PathLike) -> None:
    """Create the folder ``location`` and its parents (object stores: nothing to create)."""
    filesystem, path = filesystem_of(location)
    filesystem.create_dir(path, recursive=True)


def delete(location: str | os.PathLike) -> None:
    """Remove the file or folder at ``location``; nothing there is fine."""
    filesystem, path = filesystem_of(location)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == pafs.FileType.File:
        filesystem.delete_file(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    filesystem, path = filesystem_of(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to the file ``location`` (its folder made first), whole or not at all:
    locally through a temporary file renamed over it, on an object store in one put."""
    filesystem, path = filesystem_of(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        filesystem.create_dir(parent, recursive=True)
    target = path
    if isinstance(filesystem, pafs.LocalFileSystem):
        target = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    with filesystem.open_output_stream(target) as stream:
        stream.write(data)
    if target != path:
        os.replace(target, path)
    return str(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def list_names(location: str | os.PathLike) -> list[str]:
    """The names of the files and folders directly in the folder ``location``, sorted
    (none when it does not exist)."""
    filesystem, path = filesystem_of(location)
    selector = pafs.FileSelector(path, allow_not_found=True)
    return sorted(info.base_name for info in filesystem.get_file_info(selector))


def upload(local_dir: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy the files of the local folder ``local_dir`` into the folder ``location`` (files
    already there and not in ``local_dir`` stay)."""
    filesystem, path = filesystem_of(location)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(
        str(Path(local_dir).resolve()),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=filesystem,
    )
    return str(location)


def download(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy the folder ``location`` into the local folder ``local_dir``."""
    filesystem, path = filesystem_of(location)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        path,
        str(local.resolve()),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    return local


def replace_dir(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the folder ``source`` where ``target`` is (a finished build published under its
    final name; a target already there is kept: an identical build finished first). Local:
    one rename. An object store has no rename: a copy, then ``source`` deleted."""
    if not is_uri(source):
        try:
            os.replace(source, target)
        except OSError:  # another builder finished first; theirs is identical
            shutil.rmtree(source, ignore_errors=True)
        return
    if not exists(target):
        filesystem, path = filesystem_of(source)
        _, target_path = filesystem_of(target)
        pafs.copy_files(path, target_path, source_filesystem=filesystem,
                        destination_filesystem=filesystem)  # fmt: skip
    delete(source)


@contextlib.contextmanager
def staged(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder whose files end up in the folder ``location``: the folder itself when
    it is local (made first), else a temporary one uploaded when the block ends without an
    error. For writers that need a real folder (matplotlib, Hugging Face, TensorBoard)."""
    if not is_uri(location):
        folder = Path(location)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="ser_ray-") as tmp:
        yield Path(tmp)
        upload(tmp, location)


def node_cache_dir() -> Path:
    """This node's own cache folder (``$SER_RAY_CACHE``, default ``~/.cache/ser_ray``)."""
    return Path(os.environ.get("SER_RAY_CACHE", Path.home() / ".cache" / "ser_ray"))


@contextlib.contextmanager
def node_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on the local file ``path`` (made if missing), held for the block:
    processes of this node that build the same cached folder (two jobs started at once on a
    cold cache) take turns, and the second finds the first one's result."""
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def node_local(location: str | os.PathLike) -> str:
    """A local path holding the folder ``location``: a local path as it is; a URI's folder
    downloaded once per node into :func:`node_cache_dir` (``remote/<hash of the URI>``), so a
    model published to the run location is read from this node's disk. Published folders
    are never rewritten under the same name (their names carry a content key)."""
    if not is_uri(location):
        return str(location)
    key = hashlib.sha256(absolute(location).encode()).hexdigest()[:16]
    local = node_cache_dir() / "remote" / key
    if local.is_dir():
        return str(local)
    partial = local.parent / f".{key}.{uuid.uuid4().hex[:8]}"
    download(location, partial)
    try:
        os.replace(partial, local)
    except OSError:  # another process on this node got it first
        shutil.rmtree(partial, ignore_errors=True)
    return str(local)


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


def speaker_rows(
    folder: str | os.PathLike,
    speakers: Sequence[int] | None,
    *,
    labels: Sequence[str] | None = None,
    exclude_invalid_files: bool = False,
) -> tuple[pads.Dataset, pads.Expression | None]:
    """(pyarrow dataset of a Parquet folder, local or URI; the filter that keeps the rows of
    ``speakers`` and of ``labels`` (the ``emotion`` column), each None for all, or None for all
    rows). ``exclude_invalid_files`` skips files that are not Parquet (e.g. a pool's
    ``rejected.csv``), at the cost of opening every file."""
    import pyarrow.dataset as pads

    filesystem, path = filesystem_of(folder)
    dataset = pads.dataset(
        path, format="parquet", filesystem=filesystem, exclude_invalid_files=exclude_invalid_files
    )
    keep = None
    if speakers is not None:
        keep = pads.field("actor").isin([int(a) for a in speakers])
    if labels is not None:
        of_labels = pads.field("emotion").isin([str(label) for label in labels])
        keep = of_labels if keep is None else keep & of_labels
    return dataset, keep


def count_rows(
    folder: str | os.PathLike,
    speakers: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
) -> int:
    """How many rows (of ``speakers`` and ``labels``; all when None) a Parquet folder holds
    (from the files' metadata, or those columns only)."""
    dataset, keep = speaker_rows(folder, speakers, labels=labels)
    return dataset.count_rows(filter=keep)


def list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<float32> column as float32 numpy arrays (no Python floats in between)."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # pyarrow may keep one chunk
        column = column.chunk(0) if column.num_chunks else pa.array([], column.type)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
