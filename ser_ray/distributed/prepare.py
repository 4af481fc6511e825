"""The feature pipeline: corpus -> Parquet features + ``rejected.csv``, on Ray Data or in-process.

Clips are featurized (:func:`ser_ray.features.featurize.featurize_batch`) inside Ray Data tasks
(``map_batches``); each task writes its usable rows to its own Parquet file and hands the driver
only (path, reject reason) per clip, so waveforms never pass through the driver and memory stays
flat in corpus size. Every input file ends up either as a row of ``features/`` or as a row of
``rejected.csv`` (``ok + rejected == input``, checked). A re-run on unchanged input and
configuration reuses the previous output; a folder prepared without eGeMAPS gains them later
without redoing the rest (:func:`ser_ray.features.featurize.add_egemaps`), and one prepared
with them serves runs that do not use them. A corpus too small to pay for starting Ray
(:data:`IN_PROCESS_MAX_CLIPS`) goes through the same batch function in the calling process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from ser_ray.common import storage
from ser_ray.common.errors import MissingInputError
from ser_ray.common.storage import count_rows
from ser_ray.corpus import sources
from ser_ray.corpus.clips import UNKNOWN_SPEAKER, ClipTable
from ser_ray.corpus.demo_corpus import demo_source
from ser_ray.corpus.protocol import Protocol, ProtocolSettings, resolve_protocol
from ser_ray.distributed import resources
from ser_ray.distributed.published import published_corpus
from ser_ray.features import audio
from ser_ray.features.featurize import (
    OUTCOME_SCHEMA,
    FeatureConfig,
    add_egemaps,
    clips_of_features,
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
    out_dir: str  # a location: local folder or URI (ser_ray.common.storage)
    features_dir: str
    rejected_csv: str
    n_input: int
    n_ok: int
    n_rejected: int
    reused: bool  # True when a previous identical run was reused
    seconds: float
    runner: str  # where the clips were featurized: "in-process" or "ray"


@dataclasses.dataclass
class CorpusInputs:
    """What a prepare run reads: the corpus's clip table and the rows the featurizing
    batches get (:func:`ser_ray.features.featurize.input_table`, with the audio bytes of a
    ``save_to_disk`` copy)."""

    corpus: ClipTable
    table: pa.Table

    @property
    def n_input(self) -> int:
        return len(self.corpus.frame) + len(self.corpus.skipped)


def read_corpus_inputs(
    source: str,
    config: FeatureConfig = DEFAULT_FEATURES,
    speaker_regex: str | None = None,
    unknown_speaker: str = UNKNOWN_SPEAKER,
) -> CorpusInputs:
    """The clips of ``source`` (:func:`ser_ray.corpus.sources.read_corpus`, ``speaker_regex``
    for an EmoBox file, ``unknown_speaker`` the speaker value of a manifest's clips whose
    speaker is not known; or a ``save_to_disk`` copy). Raises when there is no audio file at
    all."""
    if "://" not in source and is_hf_dataset(Path(source)):
        corpus, blobs = hf_inputs(Path(source))
    else:
        corpus = sources.read_corpus(
            source,
            speech_only=config.speech_only,
            speaker_regex=speaker_regex,
            unknown_speaker=unknown_speaker,
        )
        blobs = None
    table = input_table(corpus)
    if blobs is not None:
        table = table.append_column("audio_bytes", blobs)
    inputs = CorpusInputs(corpus, table)
    if inputs.n_input == 0:
        raise MissingInputError(
            f"{source}: no audio files found; expected a RAVDESS or CREMA-D folder, a clip "
            "manifest (CSV/JSONL) or a datasets save_to_disk copy"
        )
    return inputs


def prepare_features(
    data_dir: str | Path,
    out_dir: str | Path,
    config: FeatureConfig = DEFAULT_FEATURES,
    connect: Callable[[], None] = lambda: None,
    runner: str = "auto",
    inputs: CorpusInputs | None = None,
) -> PrepareResult:
    """Turn a RAVDESS-layout folder (local or URI) or a ``save_to_disk`` copy into
    ``out_dir/features/`` (Parquet), ``out_dir/rejected.csv`` and ``out_dir/config.json``.

    ``runner``: ``"ray"`` featurizes in Ray Data tasks, ``"in-process"`` here, one batch after
    the other (same batches, same files' content), ``"auto"`` in-process for corpora of at
    most :data:`IN_PROCESS_MAX_CLIPS` clips. ``connect`` starts or joins Ray; it runs only when
    Ray does the work, so a re-run on unchanged input returns before Ray starts. ``inputs``:
    the corpus already read (:func:`read_corpus_inputs` of ``data_dir``)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner={runner!r}: choose one of {', '.join(RUNNERS)}")
    start = time.perf_counter()
    if config.egemaps:
        audio.check_opensmile()  # fail here, before any work, where openSMILE cannot run
    out = storage.absolute(out_dir)
    features_dir, rejected_csv, config_json = (
        storage.join(out, "features"),
        storage.join(out, "rejected.csv"),
        storage.join(out, "config.json"),
    )
    source = str(data_dir)
    inputs = inputs or read_corpus_inputs(source, config)
    key = fingerprint(inputs.corpus, config)
    previous = _previous_run(config_json, features_dir, key)
    if previous is not None:
        if config.egemaps and not previous["features"]["egemaps"]:
            previous = _add_egemaps(out, previous, config, runner, connect)
        else:
            log.info("features in %s are up to date; reusing them", features_dir)
        counts = previous["counts"]
        return PrepareResult(
            out, features_dir, rejected_csv, counts["input"], counts["ok"],
            counts["rejected"], True, time.perf_counter() - start,
            previous.get("runner", "ray"),
        )  # fmt: skip

    # written in place: its _SUCCESS mark, written last, says the folder is complete (an
    # object store has no folder rename to publish a staged one with)
    storage.delete(features_dir)
    storage.make_dirs(features_dir)
    runner, outcome = _featurize(inputs.table, config, features_dir, runner, connect)
    ok, rejected = _checked_outcome(outcome, inputs, features_dir)

    counts = {"input": inputs.n_input, "ok": ok.num_rows, "rejected": len(rejected)}
    record = {
        "job": "prepare",
        "data_dir": source,
        "source": inputs.corpus.source,
        "label_order": inputs.corpus.label_order,
        "runner": runner,
        "features": dataclasses.asdict(config),
        "fingerprint": key,
        "counts": counts,
    }
    seconds = _write_outputs(
        ok, rejected, record, start,
        features_dir=features_dir, rejected_csv=rejected_csv, config_json=config_json,
    )  # fmt: skip
    log.info(
        "features (%s): %d ok, %d rejected in %.1f s -> %s",
        runner, ok.num_rows, len(rejected), seconds, out,
    )  # fmt: skip
    return PrepareResult(
        out, features_dir, rejected_csv, inputs.n_input, ok.num_rows, len(rejected), False,
        seconds, runner,
    )  # fmt: skip


def _previous_run(config_json: str, features_dir: str, key: str) -> dict | None:
    """The record (``config.json``) of a finished earlier run with the same fingerprint
    ``key`` (same inputs and settings), whose output can be reused; None if there is none."""
    if storage.exists(config_json) and storage.exists(storage.join(features_dir, "_SUCCESS")):
        previous = json.loads(storage.read_text(config_json))
        if previous.get("fingerprint") == key:
            return previous
    return None


def _featurize(
    table: pa.Table,
    config: FeatureConfig,
    staging: str,
    runner: str,
    connect: Callable[[], None],
) -> tuple[str, pa.Table]:
    """Featurize the clips of ``table`` into the folder ``staging`` on Ray (``connect``
    first) or here, as ``runner`` says; (where it ran, the outcome rows: path, actor,
    reject reason, ...)."""
    if _on_ray(runner, table.num_rows):
        connect()
        runner, outcomes = "ray", _featurize_on_ray(table, config, staging)
    else:
        runner, outcomes = "in-process", _featurize_in_process(table, config, staging)
    return runner, pa.concat_tables(outcomes) if outcomes else OUTCOME_SCHEMA.empty_table()


def _checked_outcome(
    outcome: pa.Table, inputs: CorpusInputs, staging: str
) -> tuple[pa.Table, list[dict[str, str]]]:
    """(usable rows, rejected files as {path, reason}), checked to add up: every input is one
    or the other, and the Parquet files in ``staging`` hold exactly the usable rows."""
    rejected = [{"path": p, "reason": r} for p, r in inputs.corpus.skipped]
    bad = outcome.filter(outcome.column("reject_reason").is_valid()).to_pydict()
    rejected += [
        {"path": p, "reason": r} for p, r in zip(bad["path"], bad["reject_reason"], strict=True)
    ]
    ok = outcome.filter(outcome.column("reject_reason").is_null())
    n_ok = ok.num_rows
    written = count_rows(staging)
    if n_ok + len(rejected) != inputs.n_input or written != n_ok:
        raise RuntimeError(
            f"internal error: {n_ok} features ({written} written) + {len(rejected)} rejected "
            f"!= {inputs.n_input} inputs"
        )
    return ok, rejected


def _write_outputs(
    ok: pa.Table,
    rejected: list[dict[str, str]],
    record: dict,
    start: float,
    *,
    features_dir: str,
    rejected_csv: str,
    config_json: str,
) -> float:
    """Publish a checked run (its Parquet files already in ``features_dir``):
    ``rejected.csv``, ``config.json`` (``record`` with the speakers found and the seconds since
    ``start``) and, last, the ``_SUCCESS`` mark a re-run looks for. Returns the seconds."""
    speakers = set(ok.column("actor").to_pylist())
    write_rejected(rejected_csv, rejected)
    seconds = time.perf_counter() - start
    record = {**record, "actors": sorted(speakers), "seconds": round(seconds, 2)}
    _publish_record(record, config_json, features_dir)
    return seconds


def _publish_record(record: dict, config_json: str, features_dir: str) -> None:
    """``record`` as ``config.json``, then the ``_SUCCESS`` mark a re-run looks for."""
    storage.write_text(config_json, json.dumps(record, indent=2))
    storage.write_text(storage.join(features_dir, "_SUCCESS"), record["fingerprint"])


def _on_ray(runner: str, n_clips: int) -> bool:
    """Whether ``runner`` (:data:`RUNNERS`) works on Ray for ``n_clips`` clips."""
    return runner == "ray" or (runner == "auto" and n_clips > IN_PROCESS_MAX_CLIPS)


def _add_egemaps(
    out: str, record: dict, config: FeatureConfig, runner: str, connect: Callable[[], None]
) -> dict:
    """Give the folder ``out`` (prepared without eGeMAPS, ``record`` its ``config.json``)
    its ``egemaps`` column, file by file in Ray tasks or here (as ``runner`` says), keeping
    everything else; returns the updated record. The ``_SUCCESS`` mark is off meanwhile, so
    a run cut short is redone whole next time."""
    start = time.perf_counter()
    features_dir = storage.join(out, "features")
    prefix = storage.uri_prefix(features_dir)
    files = [prefix + f for f in storage.parquet_files(features_dir)[1]]
    storage.delete(storage.join(features_dir, "_SUCCESS"))
    n_ok = record["counts"]["ok"]
    if _on_ray(runner, n_ok):
        import ray

        connect()
        task = ray.remote(add_egemaps).options(**resources.egemaps_task())
        rows = ray.get([task.remote(f, config.target_sr_hz) for f in files])
    else:
        rows = [add_egemaps(f, config.target_sr_hz) for f in files]
    if sum(rows) != n_ok:
        raise RuntimeError(
            f"{features_dir}: {sum(rows)} rows in its files, {n_ok} in config.json; prepare the "
            "features again (delete the folder)"
        )
    seconds = time.perf_counter() - start
    record = {
        **record,
        "features": dataclasses.asdict(config),
        "egemaps_added_s": round(seconds, 2),
    }
    _publish_record(record, storage.join(out, "config.json"), features_dir)
    log.info("eGeMAPS added to the %d clips of %s in %.1f s", n_ok, out, seconds)
    return record


def _featurize_on_ray(table: pa.Table, config: FeatureConfig, staging: str) -> list[pa.Table]:
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


def _featurize_in_process(table: pa.Table, config: FeatureConfig, staging: str) -> list[pa.Table]:
    """The clips of ``table`` featurized here, ``config.batch_size`` at a time; their outcome
    rows, per batch."""
    step = config.batch_size
    return [
        featurize_batch(table.slice(i, step), config, str(staging))
        for i in range(0, table.num_rows, step)
    ]


def prepare_demo(
    out_dir: str | Path, smoke_test: bool = False, config: FeatureConfig = DEFAULT_FEATURES
) -> str:
    """Prepare the demo corpus's features into ``out_dir`` and return the features folder."""
    return prepare_features(demo_source(smoke_test), out_dir, config).features_dir


def features_for_job(
    features_dir: str | None,
    data_dir: str | None,
    out_dir: str | Path,
    smoke_test: bool = False,
    protocol: ProtocolSettings | None = None,
) -> tuple[str, Protocol]:
    """A job's features folder and the protocol of its clips: ``--features`` as given, else
    prepared (or reused) from ``--data-dir`` or the demo corpus into ``out_dir/prepared``."""
    if not features_dir:
        source = data_dir or published_corpus(demo_source(smoke_test), str(out_dir))
        features_dir = prepare_features(source, storage.join(out_dir, "prepared")).features_dir
    settings = protocol or ProtocolSettings()
    return str(features_dir), resolve_protocol(clips_of_features(features_dir), settings)
