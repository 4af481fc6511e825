"""Clips -> feature rows, and the features Parquet read back (no Ray).

:func:`featurize_clip` reads, decodes, downmixes and resamples one clip to 16 kHz, optionally
trims it and computes its MFCC statistics (and eGeMAPS), or says why the clip is unusable;
:func:`featurize_batch` does a batch of them and writes the usable rows to one Parquet file,
returning one small outcome row (path, reject reason) per clip. Where the batches run (Ray Data
tasks or this process) is :mod:`ser_ray.distributed.prepare`'s choice. :func:`load_features`
and :func:`to_hf_dataset` read a finished features folder back.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ser_ray.common import storage
from ser_ray.common.errors import MissingInputError
from ser_ray.corpus import ravdess
from ser_ray.corpus.clips import ClipTable, clip_frame, speaker_numbers
from ser_ray.features import audio

log = logging.getLogger(__name__)

FEATURE_SCHEMA_VERSION = 3  # 2: the egemaps column; 3: clip-table columns, no scheme fold


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How clips become features (saved in ``config.json``; a change re-runs the work)."""

    target_sr_hz: int = dataclasses.field(
        default=audio.TARGET_SR_HZ,
        metadata={"help": "sample rate of the features (wav2vec2: 16 kHz)"},
    )
    n_mfcc: int = dataclasses.field(default=40, metadata={"help": "MFCCs per frame"})
    mfcc_deltas: bool = dataclasses.field(
        default=False, metadata={"help": "add mean/std of first-order deltas to mfcc_stats"}
    )
    egemaps: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "eGeMAPSv02 functionals by openSMILE (a null column when off)",
            "flag_help": "skip the eGeMAPSv02 functionals (openSMILE); the SVM can then use "
            "MFCC only",
        },
    )
    trim_silence: bool = dataclasses.field(
        default=False, metadata={"help": "cut leading/trailing silence before features"}
    )
    trim_top_db: float = dataclasses.field(
        default=40.0, metadata={"help": "what counts as silence when trimming (dB below peak)"}
    )
    silent_dbfs: float = dataclasses.field(
        default=-60.0, metadata={"help": "reject clips whose peak is below this level"}
    )
    min_duration_s: float = dataclasses.field(
        default=0.25, metadata={"help": "reject shorter clips (after trimming)"}
    )
    max_duration_s: float = dataclasses.field(
        default=60.0, metadata={"help": "reject longer clips (RAVDESS clips are 2.9-5.3 s)"}
    )
    speech_only: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "keep audio-only speech (03-01) only",
            "flag": "--all-modalities",
            "flag_help": "keep song/video names too (default: audio-only speech 03-01)",
        },
    )
    batch_size: int = dataclasses.field(
        default=128,
        metadata={"help": "most clips per Ray Data task and Parquet file (not held at once)"},
    )

    def __post_init__(self) -> None:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")

    @property
    def mfcc(self) -> audio.MfccConfig:
        return audio.MfccConfig(n_mfcc=self.n_mfcc, deltas=self.mfcc_deltas)


# A clip's row of the corpus's clip table (ser_ray.corpus.clips): ``actor`` is the speaker's
# number (clips.speaker_numbers), ``speaker`` its name, ``emotion`` the corpus's own label
# (before any label map); the RAVDESS name fields are null for other corpora.
META_FIELDS = [
    ("path", pa.string()),
    ("actor", pa.int32()),
    ("speaker", pa.string()),
    ("gender", pa.string()),
    ("emotion", pa.string()),
    ("emotion_code", pa.int32()),
    ("intensity", pa.int32()),
    ("statement", pa.int32()),
    ("repetition", pa.int32()),
    ("session", pa.string()),
    ("fold", pa.string()),
    ("split", pa.string()),
    ("corpus", pa.string()),
]
META_NAMES = [name for name, _ in META_FIELDS]
FEATURE_SCHEMA = pa.schema(
    META_FIELDS
    + [
        ("sample_rate_hz", pa.int32()),
        ("duration_s", pa.float64()),
        ("num_samples", pa.int64()),
        ("waveform", pa.list_(pa.float32())),
        ("mfcc_mean", pa.list_(pa.float32())),
        ("mfcc_std", pa.list_(pa.float32())),
        ("mfcc_stats", pa.list_(pa.float32())),
        ("egemaps", pa.list_(pa.float32())),
    ]
)
# What a featurize_clip row holds: the feature row plus a rejection reason (null when usable).
RESULT_SCHEMA = FEATURE_SCHEMA.append(pa.field("reject_reason", pa.string()))
# What a Ray task hands back to the driver: one small row per clip, no audio.
OUTCOME_SCHEMA = pa.schema(
    [("path", pa.string()), ("actor", pa.int32()), ("reject_reason", pa.string())]
)
# Clips featurized and written at a time inside a batch (one Parquet row group each): bounds a
# worker's memory (~0.25 MB of waveform per RAVDESS clip, a few copies of it while writing).
WRITE_CHUNK_CLIPS = 16


def featurize_clip(row: dict, config: FeatureConfig) -> dict:
    """One clip (a row of :func:`input_table`) -> one result row (features, or a reject
    reason). Pure except for reading."""
    out = {name: None for name in RESULT_SCHEMA.names}
    out.update({key: row.get(key) for key in META_NAMES})
    try:
        data = row.get("audio_bytes") or audio.read_bytes(row["path"])
        samples, sr_hz = audio.decode(data)
        y = audio.resample(audio.to_mono(samples), sr_hz, config.target_sr_hz)
        if audio.peak_dbfs(y) < config.silent_dbfs:
            raise audio.AudioError(
                f"silent: peak {audio.peak_dbfs(y):.1f} dBFS is below silent_dbfs="
                f"{config.silent_dbfs:g}"
            )
        if config.trim_silence:
            y = audio.trim_silence(y, config.trim_top_db)
        duration_s = y.size / config.target_sr_hz
        if duration_s < config.min_duration_s:
            raise audio.AudioError(
                f"too short: {duration_s:.3f} s < min_duration_s={config.min_duration_s:g}"
            )
        if duration_s > config.max_duration_s:
            raise audio.AudioError(
                f"too long: {duration_s:.1f} s > max_duration_s={config.max_duration_s:g} "
                "(raise --max-duration-s to keep it)"
            )
        out.update(audio.mfcc_stats(y, config.target_sr_hz, config.mfcc))
        if config.egemaps:
            out["egemaps"] = audio.egemaps_functionals(y, config.target_sr_hz)
    except audio.AudioError as err:
        out["reject_reason"] = str(err)
        return out
    out.update(
        sample_rate_hz=config.target_sr_hz,
        duration_s=duration_s,
        num_samples=y.size,
        waveform=y,
    )
    return out


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """``pa.Table.from_pylist(rows, schema=schema)``, with the float32 list columns (waveforms,
    features) built from their numpy arrays in one copy instead of element by element
    (pyarrow's own conversion costs ~1 ms per clip for a waveform, a third of featurizing it)."""
    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if pa.types.is_list(field.type) and field.type.value_type == pa.float32():
            columns.append(float32_lists(values))
        else:
            columns.append(pa.array(values, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def float32_lists(values: list) -> pa.ListArray:
    """A ``list<float32>`` column from one array (or None) per row, in one copy."""
    arrays = [np.asarray(v, np.float32).reshape(-1) for v in values if v is not None]
    lengths = [0 if v is None else len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in values], pa.bool_())
    return pa.ListArray.from_arrays(offsets, flat, pa.list_(pa.float32()), mask=mask)


def featurize_batch(batch: pa.Table, config: FeatureConfig, staging_dir: str) -> pa.Table:
    """The ``map_batches`` function: featurize a batch, write its usable rows to
    ``staging_dir/part-<first input index>.parquet`` and return one outcome row per clip.

    Clips are featurized and written :data:`WRITE_CHUNK_CLIPS` at a time (one Parquet row
    group each), so a worker holds at most that many waveforms whatever the batch size."""
    path = storage.join(staging_dir, f"part-{min(batch.column('index').to_pylist()):06d}.parquet")
    outcomes, writer = [], None
    try:
        for start in range(0, batch.num_rows, WRITE_CHUNK_CLIPS):
            chunk = batch.slice(start, WRITE_CHUNK_CLIPS).to_pylist()
            rows = [featurize_clip(row, config) for row in chunk]
            outcomes.append(rows_to_table(rows, OUTCOME_SCHEMA))
            usable = [row for row in rows if row["reject_reason"] is None]
            if not usable:
                continue
            if writer is None:
                writer = feature_writer(path)
            writer.write_table(rows_to_table(usable, FEATURE_SCHEMA))
    finally:
        if writer is not None:
            writer.close()
    # Arrow's allocator keeps freed buffers for reuse: ~90 MB per worker after a 64-clip batch
    pa.default_memory_pool().release_unused()
    return pa.concat_tables(outcomes) if outcomes else OUTCOME_SCHEMA.empty_table()


def feature_writer(location: str | Path) -> pq.ParquetWriter:
    """A writer of one features file (:data:`FEATURE_SCHEMA`), local or on a URI."""
    filesystem, path = storage.filesystem_of(location)
    # waveforms barely compress; skipping it saves the writer most of its time
    return pq.ParquetWriter(
        path,
        FEATURE_SCHEMA,
        filesystem=filesystem,
        compression={"waveform": "NONE"},
        use_dictionary=False,
    )


def add_egemaps(path: str, target_sr_hz: int) -> int:
    """Fill the ``egemaps`` column of the features file ``path`` (prepared without eGeMAPS)
    from its waveforms and rewrite the file (locally a new file renamed over it; an object
    store replaces an object in one put): the values :func:`featurize_clip` computes, from
    the same signal. Returns the file's rows."""
    filesystem, inside = storage.filesystem_of(path)
    table = pq.read_table(inside, schema=FEATURE_SCHEMA, filesystem=filesystem)
    egemaps = float32_lists(
        [
            audio.egemaps_functionals(wave.values.to_numpy(), target_sr_hz)
            for wave in table.column("waveform")
        ]
    )
    table = table.set_column(FEATURE_SCHEMA.get_field_index("egemaps"), "egemaps", egemaps)
    partial = path if storage.is_uri(path) else f"{path}.partial"
    with feature_writer(partial) as writer:
        writer.write_table(table, row_group_size=WRITE_CHUNK_CLIPS)
    if partial != path:
        os.replace(partial, path)
    return table.num_rows


def fingerprint(corpus: ClipTable, config: FeatureConfig) -> str:
    """What a prepared folder was made from: each clip's row of the clip table (path, size,
    time, speaker, label, ...), the files left out, and the settings but ``egemaps``, which
    a folder can gain later (:func:`add_egemaps`) and which a run that does not use them
    need not drop."""
    settings = {**dataclasses.asdict(config), "egemaps": None}
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(str(FEATURE_SCHEMA_VERSION).encode())
    keys = ["path", "size_bytes", "mtime_ns", "speaker", "emotion", "gender", "session"]
    keys += ["fold", "split", "corpus"]
    for row in corpus.frame[keys].itertuples(index=False):
        digest.update(json.dumps([None if pd.isna(v) else v for v in row], default=str).encode())
    for path, _ in corpus.skipped:
        digest.update(json.dumps([path]).encode())
    return digest.hexdigest()


def input_table(corpus: ClipTable) -> pa.Table:
    """What the featurizing batches read: per clip its index in input order and its
    :data:`META_FIELDS` (``actor``: the speaker's number)."""
    frame = corpus.frame
    numbers = speaker_numbers(frame["speaker"])
    columns = {"index": pa.array(range(len(frame)), pa.int64())}
    for name, kind in META_FIELDS:
        if name == "actor":
            values = [numbers[s] for s in frame["speaker"]]
        elif name in frame.columns and pa.types.is_string(kind):
            values = [None if pd.isna(v) else str(v) for v in frame[name]]
        elif name in frame.columns:  # RAVDESS name fields; a manifest's text ones -> null
            numbers = pd.to_numeric(frame[name], errors="coerce")
            values = [None if pd.isna(v) else int(v) for v in numbers]
        else:
            values = [None] * len(frame)
        columns[name] = pa.array(values, kind)
    return pa.table(columns)


def is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def hf_inputs(path: Path) -> tuple[ClipTable, pa.Array | None]:
    """A corpus saved with ``datasets.save_to_disk`` -> (its clip table, the audio bytes of
    each of its clips, in table order, or None when the dataset holds paths only).

    Speaker and label come from ``speaker`` (or ``speaker_id``/``actor``) and ``emotion`` (or
    ``label``; class labels by name) columns; without them, from RAVDESS file names (names
    that do not parse are left out, with the reason)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    paths, blobs = _hf_audio(loaded, path)
    speaker = _first_column(loaded, ("speaker", "speaker_id", "actor"))
    label = _first_column(loaded, ("emotion", "label"))
    if speaker and label:
        emotions = loaded[label]
        feature = loaded.features[label]
        if isinstance(feature, datasets.ClassLabel):
            emotions = [feature.int2str(int(e)) for e in emotions]
        frame = clip_frame(
            {"path": p, "speaker": str(s), "emotion": str(e)}
            for p, s, e in zip(paths, loaded[speaker], emotions, strict=True)
        )
        return ClipTable(frame, [], "datasets.save_to_disk"), blobs
    clips, skipped, keep = [], [], []
    for i, name in enumerate(paths):
        try:
            clips.append(ravdess.clip_from_name(name, ravdess.parse_name(name)))
            keep.append(i)
        except ravdess.RavdessNameError as err:
            skipped.append((name, str(err).split(": ", 1)[-1]))
    table = ravdess.clip_table(clips, skipped)
    table.source = "datasets.save_to_disk"
    return table, None if blobs is None else blobs.take(pa.array(keep, pa.int64()))


def _hf_audio(loaded, path: Path) -> tuple[list[str], pa.Array | None]:
    """(file name of each row, its audio bytes or None) of a saved dataset."""
    import datasets

    audio_cols = [n for n, f in loaded.features.items() if isinstance(f, datasets.Audio)]
    if audio_cols:
        column = audio_cols[0]
        loaded = loaded.cast_column(column, datasets.Audio(decode=False))
        table = loaded.select_columns([column]).with_format("arrow")[:]
        paths = table.column(column).combine_chunks().field("path").to_pylist()
        blobs = table.column(column).combine_chunks().field("bytes").cast(pa.binary())
    else:
        name = _first_column(loaded, ("path", "file", "filename"))
        if not name:
            raise ValueError(
                f"{path}: the saved dataset has no Audio column and no path/file column; "
                f"columns are {loaded.column_names}"
            )
        paths, blobs = loaded[name], None
    bad = [i for i, p in enumerate(paths) if not p]
    if bad:
        raise ValueError(f"{path}: rows {bad[:10]} of the saved dataset have no file name")
    return paths, blobs


def _first_column(loaded, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in loaded.column_names), None)


def write_rejected(location: str | Path, rejected: list[dict]) -> None:
    """``rejected.csv``: path, reason of each unusable file, by path."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["path", "reason"])
    writer.writeheader()
    writer.writerows(sorted(rejected, key=lambda r: r["path"]))
    storage.write_text(location, text.getvalue())


def clips_of_features(features_dir: str | Path) -> ClipTable:
    """The clip table of the usable clips of a prepared features folder (its meta columns;
    the corpus's kind and class order from the ``config.json`` beside it), for jobs that
    start from ``--features``."""
    frame = load_features(features_dir, META_NAMES).drop(columns=["actor"])
    record_file = storage.join(storage.parent(features_dir), "config.json")
    record = json.loads(storage.read_text(record_file)) if storage.exists(record_file) else {}
    order = record.get("label_order")
    return ClipTable(
        clip_frame(frame.to_dict("records")),
        [],
        record.get("source", record.get("input_kind", "ravdess")),  # the key before 2026-12
        tuple(order) if order else None,
    )


def _parquet_files(features_dir: str | Path) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, the Parquet files of finished features in name order: the ``part-*``
    files written by :func:`featurize_batch`); ``FileNotFoundError`` naming the fix when not
    finished."""
    if not storage.exists(storage.join(features_dir, "_SUCCESS")):
        raise MissingInputError(
            f"{features_dir}: no finished features here; run `python jobs/prepare.py --out "
            f"{storage.parent(features_dir)}` first"
        )
    return storage.parquet_files(features_dir)


def load_features(features_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The features as a pandas DataFrame (pick ``columns`` to leave the waveforms out).

    Raises ``ValueError`` when a requested column is absent from the files (features prepared
    by an older version) or was left empty (``egemaps`` of features prepared with
    ``egemaps=False``), naming the fix.
    """
    filesystem, files = _parquet_files(features_dir)
    if not files:
        return FEATURE_SCHEMA.empty_table().to_pandas()[columns or FEATURE_SCHEMA.names]
    have = set(pq.read_schema(files[0], filesystem=filesystem).names)
    _check_columns(features_dir, have, columns or FEATURE_SCHEMA.names)
    frame = pq.read_table(
        files, columns=columns, schema=FEATURE_SCHEMA, filesystem=filesystem
    ).to_pandas()
    if "egemaps" in frame.columns and frame["egemaps"].isna().any():
        raise ValueError(
            f"{features_dir}: prepared without eGeMAPS (egemaps=false); prepare again with "
            "eGeMAPS (jobs/prepare.py without --no-egemaps)"
        )
    return frame


def _check_columns(features_dir: str | Path, have: set[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(
            f"{features_dir}: prepared by an older ser_ray without column(s) {missing}; "
            "prepare the features again (jobs/prepare.py, or --data-dir, which redoes them)"
        )


def to_hf_dataset(features_dir: str | Path, columns: list[str] | None = None):
    """The features as a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets

    filesystem, files = _parquet_files(features_dir)
    table = pa.concat_tables(
        [
            pq.read_table(f, columns=columns, schema=FEATURE_SCHEMA, filesystem=filesystem)
            for f in files
        ]
    )
    return datasets.Dataset(table)
