"""Unlabeled audio for self-supervised pre-training: one Parquet layout, three sources.

A *pool* is a Parquet folder with one row per clip: ``path`` and ``waveform`` (float32,
16 kHz mono), optionally ``actor``. Three things make one:

- a features folder of ``jobs/prepare.py`` already is one (its labels are never read);
- :func:`pool_from_audio_folder`: any folder of audio files (WAV, FLAC, OGG, MP3; no RAVDESS
  names needed), decoded and resampled to 16 kHz; undecodable files are listed in
  ``rejected.csv`` with the reason;
- :func:`write_demo_pool`: the package's synthetic unlabeled pool (other voices and
  sentences than the demo corpus, see :func:`ser_ray.demo_corpus.unlabeled_pool_clips`).

:func:`read_pool` loads a pool (only the given actors' rows, when asked: TAPT for a fold
reads the fold's training actors and nothing else).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ser_ray import audio

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
POOL_FILE = "pool.parquet"
_SCHEMA = pa.schema([("path", pa.string()), ("waveform", pa.list_(pa.float32()))])


@dataclasses.dataclass
class UnlabeledClips:
    """Clips in memory, sorted by path: ``waveforms[i]`` is float32 16 kHz mono."""

    paths: list[str]
    waveforms: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(w) for w in self.waveforms], dtype=np.int64)


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
    pq.write_table(table, tmp, compression="zstd")
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
    from ser_ray.demo_corpus import SAMPLE_RATE_HZ as SYNTH_RATE_HZ
    from ser_ray.demo_corpus import unlabeled_pool_clips

    out = Path(out_dir)
    if (out / POOL_FILE).exists():
        return out
    clips = unlabeled_pool_clips(n_speakers, clips_per_speaker, speech_scale=speech_scale)
    names = [name for name, _ in clips]
    waveforms = [audio.resample(y, SYNTH_RATE_HZ, SAMPLE_RATE_HZ) for _, y in clips]
    log.info("demo pool: %d unlabeled clips of %d speakers in %s", len(names), n_speakers, out)
    return _write_pool(out, names, waveforms)


def read_pool(source: str | os.PathLike, actors: Sequence[int] | None = None) -> UnlabeledClips:
    """The clips of a pool or features folder (local or URI); with ``actors``, only those
    actors' rows (the folder must then have an ``actor`` column)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    text = str(source)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(text).resolve())
    dataset = pads.dataset(path, format="parquet", filesystem=fs, exclude_invalid_files=True)
    names = set(dataset.schema.names)
    if not {"path", "waveform"} <= names:
        raise ValueError(f"{source}: a pool needs 'path' and 'waveform' columns, has {names}")
    row_filter = None
    if actors is not None:
        if "actor" not in names:
            raise ValueError(f"{source}: no 'actor' column, so clips cannot be chosen by actor")
        row_filter = pads.field("actor").isin([int(a) for a in actors])
    table = dataset.to_table(columns=["path", "waveform"], filter=row_filter)
    table = table.sort_by("path")
    column = table.column("waveform").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    waveforms = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    return UnlabeledClips(table.column("path").to_pylist(), waveforms)
