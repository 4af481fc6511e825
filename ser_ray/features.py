"""The Ray Data feature pipeline: corpus -> Parquet features + ``rejected.csv``.

Clips are read, decoded, downmixed, resampled to 16 kHz, optionally trimmed and turned into
MFCC statistics inside Ray Data tasks (``map_batches``); the driver only streams the results
into Parquet files, so memory stays flat in corpus size. Every input file ends up either as a
row of ``features/`` or as a row of ``rejected.csv`` (``ok + rejected == input``, checked).
A re-run on unchanged input and configuration reuses the previous output.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ser_ray import audio
from ser_ray.folds import FOLD_SCHEMES, fold_of_actor
from ser_ray.ravdess import (
    NUM_ACTORS,
    RavdessNameError,
    build_manifest,
    clip_from_name,
    parse_name,
)

log = logging.getLogger(__name__)

FEATURE_SCHEMA_VERSION = 2  # 2: the egemaps column


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How clips become features (saved in ``config.json``; a change re-runs the work)."""

    target_sr_hz: int = audio.TARGET_SR_HZ  # wav2vec2 expects 16 kHz
    n_mfcc: int = 40  # MFCCs per frame
    mfcc_deltas: bool = False  # append mean/std of first-order deltas to mfcc_stats
    egemaps: bool = True  # eGeMAPSv02 functionals by openSMILE (null column when False)
    trim_silence: bool = False  # cut leading/trailing silence before features
    trim_top_db: float = 40.0  # what counts as silence when trimming (dB below peak)
    silent_dbfs: float = -60.0  # reject clips whose peak is below this level
    min_duration_s: float = 0.25  # reject shorter clips (after trimming)
    max_duration_s: float = 60.0  # reject longer clips (RAVDESS clips are 2.9–5.3 s)
    fold_scheme: str = "contiguous"  # which folds the `fold` column follows
    speech_only: bool = True  # keep audio-only speech (03-01) only
    batch_size: int = 32  # clips per Ray Data batch
    rows_per_file: int = 256  # rows per Parquet file

    def __post_init__(self) -> None:
        if self.fold_scheme not in FOLD_SCHEMES:
            raise ValueError(
                f"fold_scheme={self.fold_scheme!r}: choose one of {sorted(FOLD_SCHEMES)}"
            )
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("min_duration_s must be below max_duration_s")

    @property
    def mfcc(self) -> audio.MfccConfig:
        return audio.MfccConfig(n_mfcc=self.n_mfcc, deltas=self.mfcc_deltas)


META_FIELDS = [
    ("path", pa.string()),
    ("actor", pa.int32()),
    ("gender", pa.string()),
    ("emotion", pa.string()),
    ("emotion_code", pa.int32()),
    ("intensity", pa.int32()),
    ("statement", pa.int32()),
    ("repetition", pa.int32()),
    ("fold", pa.int32()),
]
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
# What the Ray tasks return: feature rows plus a rejection reason (null when usable).
RESULT_SCHEMA = FEATURE_SCHEMA.append(pa.field("reject_reason", pa.string()))


@dataclasses.dataclass
class PrepareResult:
    out_dir: Path
    features_dir: Path
    rejected_csv: Path
    n_input: int
    n_ok: int
    n_rejected: int
    reused: bool  # True when a previous identical run was reused
    seconds: float


def featurize_clip(row: dict, config: FeatureConfig, folds: dict[int, int]) -> dict:
    """One clip -> one result row (features, or a reject reason). Pure except for reading."""
    out = {name: None for name in RESULT_SCHEMA.names}
    out["path"] = row["path"]
    try:
        name = parse_name(row["path"])
    except RavdessNameError as err:
        out["reject_reason"] = str(err).split(": ", 1)[-1]
        return out
    clip = clip_from_name(row["path"], name)
    out.update({key: getattr(clip, key) for key, _ in META_FIELDS if key not in ("fold",)})
    out["fold"] = folds.get(clip.actor)
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


def _featurize_batch(batch: pa.Table, config: FeatureConfig) -> pa.Table:
    """The ``map_batches`` function: a batch of input rows -> a batch of result rows."""
    folds = fold_of_actor(config.fold_scheme)
    rows = [featurize_clip(row, config, folds) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _fingerprint(inputs: list[dict], config: FeatureConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(str(FEATURE_SCHEMA_VERSION).encode())
    for item in inputs:
        digest.update(
            json.dumps([item["path"], item.get("size_bytes"), item.get("mtime_ns")]).encode()
        )
    return digest.hexdigest()


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _hf_inputs(path: Path):
    """A RAVDESS copy saved with ``datasets.save_to_disk`` -> Ray dataset of (path, bytes)."""
    import datasets
    import ray

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    audio_cols = [n for n, f in loaded.features.items() if isinstance(f, datasets.Audio)]
    if audio_cols:
        column = audio_cols[0]
        loaded = loaded.cast_column(column, datasets.Audio(decode=False))
        table = loaded.select_columns([column]).with_format("arrow")[:]
        paths = table.column(column).combine_chunks().field("path").to_pylist()
        blobs = table.column(column).combine_chunks().field("bytes")
    else:
        names = [n for n in ("path", "file", "filename") if n in loaded.column_names]
        if not names:
            raise ValueError(
                f"{path}: the saved dataset has no Audio column and no path/file column; "
                f"columns are {loaded.column_names}"
            )
        paths, blobs = loaded[names[0]], None
    bad = [i for i, p in enumerate(paths) if not p]
    if bad:
        raise ValueError(f"{path}: rows {bad[:10]} of the saved dataset have no file name")
    inputs = [{"path": p, "size_bytes": None, "mtime_ns": None} for p in paths]
    table = pa.table({"path": pa.array(paths, pa.string())})
    if blobs is not None:
        table = table.append_column("audio_bytes", blobs.cast(pa.binary()))
    ds = ray.data.from_arrow(table)
    return ds, inputs


def prepare_features(
    data_dir: str | Path, out_dir: str | Path, config: FeatureConfig = FeatureConfig()
) -> PrepareResult:
    """Turn a RAVDESS-layout folder (local or URI) or a ``save_to_disk`` copy into
    ``out_dir/features/`` (Parquet), ``out_dir/rejected.csv`` and ``out_dir/config.json``."""
    import ray

    start = time.perf_counter()
    if config.egemaps:
        audio.check_opensmile()  # fail here, before any work, where openSMILE cannot run
    out = Path(out_dir)
    features_dir, rejected_csv, config_json = (
        out / "features",
        out / "rejected.csv",
        out / "config.json",
    )
    source = str(data_dir)
    skipped: list[tuple[str, str]] = []
    if "://" not in source and _is_hf_dataset(Path(source)):
        ds, inputs = _hf_inputs(Path(source))
        input_kind = "datasets.save_to_disk"
    else:
        manifest = build_manifest(source, speech_only=config.speech_only)
        skipped = manifest.skipped
        inputs = [dataclasses.asdict(c) for c in manifest.clips]
        ds = None
        input_kind = "folder"
    n_input = len(inputs) + len(skipped)
    if n_input == 0:
        raise FileNotFoundError(
            f"{source}: no audio files found; expected Actor_XX/*.wav in RAVDESS naming"
        )
    fingerprint = _fingerprint(inputs + [{"path": p} for p, _ in skipped], config)
    if config_json.exists() and (features_dir / "_SUCCESS").exists():
        previous = json.loads(config_json.read_text())
        if previous.get("fingerprint") == fingerprint:
            log.info("features in %s are up to date; reusing them", features_dir)
            counts = previous["counts"]
            return PrepareResult(
                out, features_dir, rejected_csv, counts["input"], counts["ok"],
                counts["rejected"], True, time.perf_counter() - start,
            )  # fmt: skip
    if ds is None:
        ds = ray.data.from_items(
            [{"path": item["path"]} for item in inputs],
            override_num_blocks=max(1, min(len(inputs) // config.batch_size, 200)),
        )
    results = ds.map_batches(
        _featurize_batch,
        fn_kwargs={"config": config},
        batch_size=config.batch_size,
        batch_format="pyarrow",
    )
    out.mkdir(parents=True, exist_ok=True)
    staging = out / "features.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    rejected = [{"path": p, "reason": r} for p, r in skipped]
    writer = _RollingParquetWriter(staging, config.rows_per_file)
    actors: set[int] = set()
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        reasons = batch.column("reject_reason")
        ok_mask = reasons.is_null()
        ok = batch.filter(ok_mask).drop_columns(["reject_reason"])
        if ok.num_rows:
            writer.write(ok)
            actors.update(ok.column("actor").to_pylist())
        bad = batch.filter(pa.compute.invert(ok_mask)).select(["path", "reject_reason"])
        rejected += [
            {"path": p, "reason": r} for p, r in zip(*bad.to_pydict().values(), strict=True)
        ]
    writer.close()
    n_ok = writer.rows
    if n_ok + len(rejected) != n_input:
        raise RuntimeError(
            f"internal error: {n_ok} features + {len(rejected)} rejected != {n_input} inputs"
        )
    shutil.rmtree(features_dir, ignore_errors=True)
    staging.rename(features_dir)
    _write_rejected(rejected_csv, rejected)
    missing = sorted(set(range(1, NUM_ACTORS + 1)) - actors)
    if missing:
        log.warning("actors without usable clips: %s (the six folds need all 24)", missing)
    seconds = time.perf_counter() - start
    counts = {"input": n_input, "ok": n_ok, "rejected": len(rejected)}
    config_json.write_text(
        json.dumps(
            {
                "job": "prepare",
                "data_dir": source,
                "input_kind": input_kind,
                "features": dataclasses.asdict(config),
                "fingerprint": fingerprint,
                "counts": counts,
                "actors": sorted(actors),
                "actors_missing": missing,
                "seconds": round(seconds, 2),
            },
            indent=2,
        )
    )
    (features_dir / "_SUCCESS").write_text(fingerprint)
    log.info("features: %d ok, %d rejected in %.1f s -> %s", n_ok, len(rejected), seconds, out)
    return PrepareResult(
        out, features_dir, rejected_csv, n_input, n_ok, len(rejected), False, seconds
    )


class _RollingParquetWriter:
    """Writes tables to ``part-00000.parquet``, ``part-00001.parquet``, … of bounded size."""

    def __init__(self, folder: Path, rows_per_file: int):
        self.folder, self.rows_per_file = folder, rows_per_file
        self.rows, self._files, self._writer, self._in_file = 0, 0, None, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{self._files:05d}.parquet"
                # waveforms barely compress; skipping it saves the writer most of its time
                self._writer = pq.ParquetWriter(
                    path, FEATURE_SCHEMA, compression={"waveform": "NONE"}, use_dictionary=False
                )
                self._files += 1
            take = min(table.num_rows, self.rows_per_file - self._in_file)
            self._writer.write_table(table.slice(0, take).cast(FEATURE_SCHEMA))
            table = table.slice(take)
            self.rows += take
            self._in_file += take
            if self._in_file >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_file = None, 0


def _write_rejected(path: Path, rejected: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "reason"])
        writer.writeheader()
        writer.writerows(sorted(rejected, key=lambda r: r["path"]))


def _parquet_files(features_dir: str | Path) -> list[str]:
    folder = Path(features_dir)
    if not (folder / "_SUCCESS").exists():
        raise FileNotFoundError(
            f"{folder}: no finished features here; run `python jobs/prepare.py --out "
            f"{folder.parent}` first"
        )
    return sorted(str(p) for p in folder.glob("part-*.parquet"))


def load_features(features_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The features as a pandas DataFrame (pick ``columns`` to leave the waveforms out).

    Raises ``ValueError`` when a requested column is absent from the files (features prepared
    by an older version) or was left empty (``egemaps`` of features prepared with
    ``egemaps=False``), naming the fix.
    """
    files = _parquet_files(features_dir)
    if not files:
        return FEATURE_SCHEMA.empty_table().to_pandas()[columns or FEATURE_SCHEMA.names]
    _check_columns(features_dir, files[0], columns or FEATURE_SCHEMA.names)
    frame = pq.read_table(files, columns=columns, schema=FEATURE_SCHEMA).to_pandas()
    if "egemaps" in frame.columns and frame["egemaps"].isna().any():
        raise ValueError(
            f"{features_dir}: prepared without eGeMAPS (egemaps=false); prepare again with "
            "eGeMAPS (jobs/prepare.py without --no-egemaps)"
        )
    return frame


def _check_columns(features_dir: str | Path, first_file: str, columns: list[str]) -> None:
    have = set(pq.read_schema(first_file).names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(
            f"{features_dir}: prepared by an older ser_ray without column(s) {missing}; "
            "prepare the features again (jobs/prepare.py, or --data-dir, which redoes them)"
        )


def read_features(features_dir: str | Path, columns: list[str] | None = None):
    """The features as a Ray dataset (streamed, for the training workers)."""
    import ray

    ds = ray.data.read_parquet(_parquet_files(features_dir))
    return ds.select_columns(columns) if columns else ds


def to_hf_dataset(features_dir: str | Path, columns: list[str] | None = None):
    """The features as a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets

    table = pa.concat_tables(
        [
            pq.read_table(f, columns=columns, schema=FEATURE_SCHEMA)
            for f in _parquet_files(features_dir)
        ]
    )
    return datasets.Dataset(table)


def mfcc_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The ``mfcc_stats`` column as a float32 matrix (clips x features)."""
    return np.stack(frame["mfcc_stats"].to_numpy()).astype(np.float32)


#: Demo corpus sizes: the full RAVDESS-sized set and the small one behind --smoke-test.
DEMO_SIZES = {
    "full": {"n_actors": 24, "clips_per_actor": 60, "speech_scale": 1.0},
    "smoke": {"n_actors": 24, "clips_per_actor": 8, "speech_scale": 0.5},
}


def demo_corpus_dir(size: str = "full", seed: int = 0) -> Path:
    """Where the demo corpus of a size is cached (``$SER_RAY_CACHE`` or ``~/.cache/ser_ray``)."""
    import os

    cache = Path(os.environ.get("SER_RAY_CACHE", Path.home() / ".cache" / "ser_ray"))
    return cache / f"demo_corpus_{size}_seed{seed}"


def demo_source(smoke_test: bool = False) -> Path:
    """Write (or reuse) the embedded demo corpus and return its folder."""
    from ser_ray.demo_corpus import write_demo_corpus

    size = "smoke" if smoke_test else "full"
    return write_demo_corpus(demo_corpus_dir(size), **DEMO_SIZES[size])


def prepare_demo(
    out_dir: str | Path, smoke_test: bool = False, config: FeatureConfig = FeatureConfig()
) -> Path:
    """Prepare the demo corpus's features into ``out_dir`` and return the features folder."""
    return prepare_features(demo_source(smoke_test), out_dir, config).features_dir


def features_for_job(
    features_dir: str | None,
    data_dir: str | None,
    out_dir: str | Path,
    smoke_test: bool = False,
    fold_scheme: str = "contiguous",
) -> Path:
    """A job's features folder: ``--features`` as given, else prepared (or reused) from
    ``--data-dir`` or the demo corpus into ``out_dir/prepared``."""
    if features_dir:
        return Path(features_dir)
    config = FeatureConfig(fold_scheme=fold_scheme)
    prepared = Path(out_dir) / "prepared"
    if data_dir:
        return prepare_features(data_dir, prepared, config).features_dir
    return prepare_demo(prepared, smoke_test=smoke_test, config=config)
