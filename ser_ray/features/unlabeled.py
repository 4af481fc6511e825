"""Unlabeled audio for self-supervised pre-training: one Parquet layout, three sources.

A *pool* is a Parquet folder with one row per clip: ``path`` and ``waveform`` (float32,
16 kHz mono), optionally ``actor``. Three things make one:

- a features folder of ``jobs/prepare.py`` already is one (its labels are never read);
- :func:`pool_from_audio_folder`: any folder of audio files (WAV, FLAC, OGG, MP3; no RAVDESS
  names needed), decoded and resampled to 16 kHz; undecodable files are listed in
  ``rejected.csv`` with the reason;
- :func:`write_demo_pool`: the package's synthetic unlabeled pool (other voices and
  sentences than the demo corpus, see :func:`ser_ray.corpus.demo_corpus.unlabeled_pool_clips`).

:func:`read_pool` loads a pool into memory (only the given speakers' rows, when asked: TAPT for
a fold reads the fold's training speakers and nothing else); Ray Train workers stream it instead
(:func:`ser_ray.distributed.pretrain_trainer.fit_pretraining`), window by window, as
:class:`UnlabeledClips` made by :func:`clips_from_arrow`, after the driver took the clip list with
:func:`pool_paths`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ser_ray.common import storage
from ser_ray.features import audio

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
POOL_FILE = "pool.parquet"
POOL_COLUMNS = ["path", "waveform"]  # what pre-training reads of a pool
ROWS_PER_GROUP = 64  # Parquet row group of a written pool: a reader holds one at a time
_SCHEMA = pa.schema([("path", pa.string()), ("waveform", pa.list_(pa.float32()))])


@dataclasses.dataclass
class UnlabeledClips:
    """Clips in memory, sorted by path: ``waveforms[i]`` is float32 16 kHz mono. A whole pool
    is one window of :class:`ser_ray.training.clip_data.Clips`; a stream hands out several."""

    paths: list[str]
    waveforms: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(w) for w in self.waveforms], dtype=np.int64)

    @property
    def window_clips(self) -> int:
        return max(1, len(self))

    def windows(self) -> Iterator[UnlabeledClips]:
        """All clips as one window (the in-memory case of
        :class:`ser_ray.training.clip_data.Clips`)."""
        yield self


def is_pool(folder: str | os.PathLike) -> bool:
    """True when ``folder`` (local) holds Parquet files (a pool or a features folder)."""
    return any(Path(folder).rglob("*.parquet"))


def _write_pool(out_dir: Path, names: list[str], waveforms: list[np.ndarray]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"path": names, "waveform": [np.asarray(w, np.float32) for w in waveforms]},
        schema=_SCHEMA,
    )
    tmp = out_dir / f".{POOL_FILE}.tmp"
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROWS_PER_GROUP)
    tmp.rename(out_dir / POOL_FILE)  # complete or absent
    return out_dir


def pool_from_audio_folder(audio_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Decode every audio file under ``audio_dir`` into a pool in ``out_dir``.

    Files that cannot be decoded go to ``out_dir/rejected.csv`` (path, reason); a folder
    without any audio file is an error.
    """
    root = Path(audio_dir)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder")
    names, waveforms, rejected = [], [], []
    for path in files:
        try:
            waveforms.append(audio.load_audio(str(path), SAMPLE_RATE_HZ))
            names.append(str(path))
        except (audio.AudioError, ValueError, RuntimeError) as err:
            rejected.append((str(path), str(err)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rejected.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(rejected)
    if not names:
        raise ValueError(f"{root}: none of {len(files)} audio files could be decoded")
    log.info("pool: %d clips from %s (%d rejected)", len(names), root, len(rejected))
    return _write_pool(out, names, waveforms)


def write_demo_pool(
    out_dir: str | os.PathLike, n_speakers: int, clips_per_speaker: int, speech_scale: float = 0.7
) -> Path:
    """The synthetic unlabeled pool (16 kHz) in ``out_dir``; kept if already complete."""
    from ser_ray.corpus.demo_corpus import SAMPLE_RATE_HZ as SYNTH_RATE_HZ
    from ser_ray.corpus.demo_corpus import unlabeled_pool_clips

    out = Path(out_dir)
    if (out / POOL_FILE).exists():
        return out
    clips = unlabeled_pool_clips(n_speakers, clips_per_speaker, speech_scale=speech_scale)
    names = [name for name, _ in clips]
    waveforms = [audio.resample(y, SYNTH_RATE_HZ, SAMPLE_RATE_HZ) for _, y in clips]
    log.info("demo pool: %d unlabeled clips of %d speakers in %s", len(names), n_speakers, out)
    return _write_pool(out, names, waveforms)


def _pool_rows(source: str | os.PathLike, speakers: Sequence[int] | None):
    """(pyarrow dataset of a pool or features folder, local or URI; the filter that keeps
    ``speakers``' rows, or None for all)."""
    dataset, keep = storage.speaker_rows(source, speakers, exclude_invalid_files=True)
    names = set(dataset.schema.names)
    if not set(POOL_COLUMNS) <= names:
        raise ValueError(f"{source}: a pool needs 'path' and 'waveform' columns, has {names}")
    if speakers is not None and "actor" not in names:
        raise ValueError(f"{source}: no 'actor' column, so clips cannot be chosen by speaker")
    return dataset, keep


def read_pool(source: str | os.PathLike, speakers: Sequence[int] | None = None) -> UnlabeledClips:
    """The clips of a pool or features folder (local or URI), in memory; with ``speakers``,
    only those speakers' rows (the folder must then have an ``actor`` column)."""
    dataset, keep = _pool_rows(source, speakers)
    return clips_from_arrow(dataset.to_table(columns=POOL_COLUMNS, filter=keep))


def pool_paths(source: str | os.PathLike, speakers: Sequence[int] | None = None) -> list[str]:
    """The paths of the clips :func:`read_pool` would read, sorted (only ``path`` is read)."""
    dataset, keep = _pool_rows(source, speakers)
    return sorted(dataset.to_table(columns=["path"], filter=keep).column("path").to_pylist())


def clips_from_arrow(table: pa.Table) -> UnlabeledClips:
    """Pool rows (``path``, ``waveform``) as clips sorted by path (waveforms not copied)."""
    from ser_ray.common.storage import list_column

    table = table.sort_by("path")
    return UnlabeledClips(table.column("path").to_pylist(), list_column(table, "waveform"))
