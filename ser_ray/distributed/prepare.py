"""The feature pipeline: corpus -> Parquet features + ``rejected.csv``, on Ray Data or in-process.

Clips are featurized (:func:`ser_ray.features.featurize.featurize_batch`) inside Ray Data tasks
(``map_batches``); each task writes its usable rows to its own Parquet file and hands the driver
only (path, reject reason) per clip, so waveforms never pass through the driver and memory stays
flat in corpus size. Every input file ends up either as a row of ``features/`` or as a row of
``rejected.csv`` (``ok + rejected == input``, checked). A re-run on unchanged input and
configuration reuses the previous output. A corpus too small to pay for starting Ray
(:data:`IN_PROCESS_MAX_CLIPS`) goes through the same batch function in the calling process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from ser_ray.common.storage import count_rows
from ser_ray.corpus.demo_corpus import demo_source
from ser_ray.corpus.ravdess import NUM_ACTORS, build_manifest
from ser_ray.distributed import resources
from ser_ray.features import audio
from ser_ray.features.featurize import (
    OUTCOME_SCHEMA,
    FeatureConfig,
    featurize_batch,
    fingerprint,
    hf_inputs,
    input_table,
    is_hf_dataset,
    write_rejected,
)

log = logging.getLogger(__name__)

DEFAULT_FEATURES = FeatureConfig()


# Corpora up to this many clips are featurized in the calling process, without Ray: starting
# Ray and its workers costs ~7 s on a 2-core machine, featurizing 64 clips ~0.2 s (MFCC) to
# ~5 s (with eGeMAPS). `runner="ray"` forces Ray whatever the size.
IN_PROCESS_MAX_CLIPS = 64


RUNNERS = ("auto", "in-process", "ray")


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
    runner: str  # where the clips were featurized: "in-process" or "ray"


def prepare_features(
    data_dir: str | Path,
    out_dir: str | Path,
    config: FeatureConfig = DEFAULT_FEATURES,
    connect: Callable[[], None] = lambda: None,
    runner: str = "auto",
) -> PrepareResult:
    """Turn a RAVDESS-layout folder (local or URI) or a ``save_to_disk`` copy into
    ``out_dir/features/`` (Parquet), ``out_dir/rejected.csv`` and ``out_dir/config.json``.

    ``runner``: ``"ray"`` featurizes in Ray Data tasks, ``"in-process"`` here, one batch after
    the other (same batches, same files' content), ``"auto"`` in-process for corpora of at
    most :data:`IN_PROCESS_MAX_CLIPS` clips. ``connect`` starts or joins Ray; it runs only when
    Ray does the work, so a re-run on unchanged input returns before Ray starts."""
    if runner not in RUNNERS:
        raise ValueError(f"runner={runner!r}: choose one of {', '.join(RUNNERS)}")
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
    if "://" not in source and is_hf_dataset(Path(source)):
        table, inputs = hf_inputs(Path(source))
        input_kind = "datasets.save_to_disk"
    else:
        manifest = build_manifest(source, speech_only=config.speech_only)
        skipped = manifest.skipped
        inputs = [dataclasses.asdict(c) for c in manifest.clips]
        table = input_table([item["path"] for item in inputs])
        input_kind = "folder"
    n_input = len(inputs) + len(skipped)
    if n_input == 0:
        raise FileNotFoundError(
            f"{source}: no audio files found; expected Actor_XX/*.wav in RAVDESS naming"
        )
    key = fingerprint(inputs + [{"path": p} for p, _ in skipped], config)
    if config_json.exists() and (features_dir / "_SUCCESS").exists():
        previous = json.loads(config_json.read_text())
        if previous.get("fingerprint") == key:
            log.info("features in %s are up to date; reusing them", features_dir)
            counts = previous["counts"]
            return PrepareResult(
                out, features_dir, rejected_csv, counts["input"], counts["ok"],
                counts["rejected"], True, time.perf_counter() - start,
                previous.get("runner", "ray"),
            )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    staging = out / "features.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if runner == "ray" or (runner == "auto" and table.num_rows > IN_PROCESS_MAX_CLIPS):
        connect()
        runner, outcomes = "ray", _featurize_on_ray(table, config, staging)
    else:
        runner, outcomes = "in-process", _featurize_in_process(table, config, staging)
    outcome = pa.concat_tables(outcomes) if outcomes else OUTCOME_SCHEMA.empty_table()
    rejected = [{"path": p, "reason": r} for p, r in skipped]
    bad = outcome.filter(outcome.column("reject_reason").is_valid()).to_pydict()
    rejected += [
        {"path": p, "reason": r} for p, r in zip(bad["path"], bad["reject_reason"], strict=True)
    ]
    ok = outcome.filter(outcome.column("reject_reason").is_null())
    n_ok = ok.num_rows
    written = count_rows(staging)
    if n_ok + len(rejected) != n_input or written != n_ok:
        raise RuntimeError(
            f"internal error: {n_ok} features ({written} written) + {len(rejected)} rejected "
            f"!= {n_input} inputs"
        )
    actors = set(ok.column("actor").to_pylist())
    shutil.rmtree(features_dir, ignore_errors=True)
    staging.rename(features_dir)
    write_rejected(rejected_csv, rejected)
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
                "runner": runner,
                "features": dataclasses.asdict(config),
                "fingerprint": key,
                "counts": counts,
                "actors": sorted(actors),
                "actors_missing": missing,
                "seconds": round(seconds, 2),
            },
            indent=2,
        )
    )
    (features_dir / "_SUCCESS").write_text(key)
    log.info(
        "features (%s): %d ok, %d rejected in %.1f s -> %s",
        runner, n_ok, len(rejected), seconds, out,
    )  # fmt: skip
    return PrepareResult(
        out, features_dir, rejected_csv, n_input, n_ok, len(rejected), False, seconds, runner
    )


def _featurize_on_ray(table: pa.Table, config: FeatureConfig, staging: Path) -> list[pa.Table]:
    """The clips of ``table`` featurized in Ray Data tasks (RAY); their outcome rows, per task."""
    import ray

    batch_size, n_tasks = resources.featurize_tasks(table.num_rows, config.batch_size)
    blocks = [table.slice(i * batch_size, batch_size) for i in range(n_tasks)]
    # from_blocks reads each block's size here; from_arrow runs a 1-CPU task per block for it,
    # which held both CPUs of a fresh 2-CPU instance before the first clip was read
    clips = ray.data.from_blocks(blocks)
    clips.context.op_resource_reservation_enabled = resources.FEATURIZE_OP_RESERVATION
    outcomes = clips.map_batches(
        featurize_batch,
        fn_kwargs={"config": config, "staging_dir": str(staging)},
        batch_size=batch_size,
        batch_format="pyarrow",
    ).to_arrow_refs()
    return ray.get(outcomes)


def _featurize_in_process(table: pa.Table, config: FeatureConfig, staging: Path) -> list[pa.Table]:
    """The clips of ``table`` featurized here, ``config.batch_size`` at a time; their outcome
    rows, per batch."""
    step = config.batch_size
    return [
        featurize_batch(table.slice(i, step), config, str(staging))
        for i in range(0, table.num_rows, step)
    ]


def prepare_demo(
    out_dir: str | Path, smoke_test: bool = False, config: FeatureConfig = DEFAULT_FEATURES
) -> Path:
    """Prepare the demo corpus's features into ``out_dir`` and return the features folder."""
    return prepare_features(demo_source(smoke_test), out_dir, config).features_dir


def features_for_job(
    features_dir: str | None,
    data_dir: str | None,
    out_dir: str | Path,
    smoke_test: bool = False,
    folds: str = "contiguous",
) -> Path:
    """A job's features folder: ``--features`` as given, else prepared (or reused) from
    ``--data-dir`` or the demo corpus into ``out_dir/prepared``."""
    if features_dir:
        return Path(features_dir)
    config = FeatureConfig(folds=folds)
    prepared = Path(out_dir) / "prepared"
    if data_dir:
        return prepare_features(data_dir, prepared, config).features_dir
    return prepare_demo(prepared, smoke_test=smoke_test, config=config)
