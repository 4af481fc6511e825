"""Cache of the frozen part of the encoder, computed once per clip with Ray Data.

With the CNN frozen (the default) its output depends only on the clip, so computing it in
every epoch, fold and trial is waste. :func:`build_feature_cache` runs a Ray Data
``map_batches`` over the features Parquet that computes, per clip and without padding:

- ``cnn`` (fine-tuning): the CNN feature encoder's output, (frames, conv channels);
- ``pooled`` (probe mode, whole encoder frozen): every hidden layer mean-pooled over the
  clip's frames, (num_layers + 1, hidden). Mean pooling and the weighted layer sum are both
  linear, so the head gets exactly what it would get from the full hidden states.

Per-clip computation is the reference: wav2vec2-base's CNN normalises over time (group
norm), so zero padding would change its output.

A corpus of at most :data:`IN_PROCESS_MAX_CLIPS` clips on a cluster without GPUs is
computed in the calling process by the same callable, one batch after the other: the actors'
start-up (a process, its imports, the model) costs more than the clips do.

The cache lives in ``<cache_root>/<key>-<clips>/`` where ``key`` hashes the frozen weights,
the normalisation and the kind, and ``clips`` the clips it was computed from
(:func:`clips_digest`), so neither a different model nor another corpus prepared into the same
run folder can read a stale cache; it is written to a temporary folder and renamed when
complete (concurrent builders are safe).

Columns: path, actor, emotion, num_samples, feature_rows (int32), feature_dim (int32),
features (list<float32>, row-major ``feature_rows x feature_dim``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ser_ray.common import storage
from ser_ray.common.storage import count_rows, list_column, parquet_files
from ser_ray.distributed import console, resources
from ser_ray.features.speaker_norm import speaker_normalize
from ser_ray.models.ssl import (
    CACHE_KINDS,
    HEAD_CLASSES,
    PartwiseClassifier,
    cnn_norm,
    frozen_encoder_outputs,
    load_model,
    save_model,
)
from ser_ray.training.config import TrainConfig, build_model

log = logging.getLogger(__name__)

INFO_FILE = "cache_info.json"
DATA_DIR = "data"
#: What the cache reads of the features, on Ray or in process.
INPUT_COLUMNS = ["path", "actor", "emotion", "waveform"]
# Up to this many clips the cache is computed in the calling process: two actors' start-up
# costs ~11 s on a 2-core machine, 192 clips through the demo encoder's CNN ~1.3 s (and a
# base-size CNN's ~0.1 s a clip puts the break-even near here).
IN_PROCESS_MAX_CLIPS = 256


def cache_kind(probe: bool) -> str:
    """``pooled`` in probe mode, else ``cnn``."""
    return "pooled" if probe else "cnn"


def clips_digest(features_dir: str | os.PathLike) -> str:
    """What the clips of a features folder are: the fingerprint ``jobs/prepare.py`` saved
    beside it (each clip's path, size and time, the settings), else a hash of the clips'
    paths in order (a folder without one, e.g. a URI). 12 hex digits."""
    text = str(features_dir)
    prepared = storage.join(storage.parent(text), "config.json")
    if storage.exists(prepared):
        fingerprint = json.loads(storage.read_text(prepared)).get("fingerprint")
        if fingerprint:
            return str(fingerprint)[:12]
    digest = hashlib.sha256()
    filesystem, files = parquet_files(text)
    for name in files:
        paths = pq.read_table(name, columns=["path"], filesystem=filesystem).column("path")
        digest.update("\n".join(paths.to_pylist()).encode())
    return digest.hexdigest()[:12]


def cache_key(model: PartwiseClassifier, feature_extractor, kind: str) -> str:
    """Hash of everything the cached values depend on (frozen weights, normalisation)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}")
    frozen = model.encoder.feature_extractor if kind == "cnn" else model.encoder
    digest = hashlib.sha256()
    fields = {
        "kind": kind,
        "do_normalize": bool(feature_extractor.do_normalize),
        "model_type": model.config.model_type,
        "feat_extract_norm": cnn_norm(model.config),
        "use_attention_mask": model.use_attention_mask,
        "conv_stride": list(model.config.conv_stride),
        "conv_kernel": list(model.config.conv_kernel),
    }
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name, tensor in sorted(frozen.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{kind}-{digest.hexdigest()[:16]}"


class ClipFeatureUDF:
    """Ray Data callable class: one model per actor, features per clip (no padding)."""

    def __init__(self, model_dir: str, kind: str, use_gpu: bool = False):
        torch.set_num_threads(resources.CACHE_ACTOR_THREADS)
        self.kind = kind
        classifier, self.fe = load_model(model_dir)
        self.model = PartwiseClassifier(classifier, self.fe.return_attention_mask).eval()
        if use_gpu and torch.cuda.is_available():
            self.model.to("cuda")

    def __call__(self, batch: pa.Table) -> pa.Table:
        values, rows, dims = [], [], []
        waves = list_column(batch, "waveform")
        for wave in waves:
            out = frozen_encoder_outputs(self.model, self.fe, wave, self.kind)
            values.append(out.reshape(-1))
            rows.append(out.shape[0])
            dims.append(out.shape[1])
        flat = np.concatenate(values) if values else np.zeros(0, np.float32)
        offsets = np.concatenate([[0], np.cumsum([v.size for v in values])]).astype(np.int32)
        features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
        return pa.table(
            {
                "path": batch.column("path"),
                "actor": batch.column("actor").cast(pa.int32()),
                "emotion": batch.column("emotion"),
                "num_samples": pa.array([w.shape[0] for w in waves], pa.int64()),
                "feature_rows": pa.array(rows, pa.int32()),
                "feature_dim": pa.array(dims, pa.int32()),
                "features": features,
            }
        )


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """A finished cache: its Parquet folder, kind and key."""

    path: str  # a location (ser_ray.common.storage)
    kind: str
    key: str
    num_clips: int


def _open(cache_dir: str) -> FeatureCache:
    info = json.loads(storage.read_text(storage.join(cache_dir, INFO_FILE)))
    return FeatureCache(
        storage.join(cache_dir, DATA_DIR), info["kind"], info["key"], info["num_clips"]
    )


def build_feature_cache(
    features_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    train_config: TrainConfig | None = None,
    model: str | None = None,
    probe: bool | None = None,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    batch_size: int = 16,
) -> FeatureCache:
    """The cache for this model and mode: reused when present, else built with Ray Data.

    The model comes from ``train_config`` (``model``, ``probe``), or from ``model``/``probe``.
    By default on the cluster's GPUs when it has some, else on its CPUs, with
    :func:`ser_ray.distributed.resources.feature_cache_actors` actors, or here for at most
    :data:`IN_PROCESS_MAX_CLIPS` clips without GPUs and without ``num_actors``; the rows
    come out in the features' order whatever the number of actors.
    """
    cfg = train_config or TrainConfig()
    if model is not None or probe is not None:
        cfg = dataclasses.replace(
            cfg,
            model=model if model is not None else cfg.model,
            probe=probe if probe is not None else cfg.probe,
        )
    kind = cache_kind(cfg.probe)
    net, fe = build_model(cfg, HEAD_CLASSES)  # the head is not cached: any two classes
    key = cache_key(net, fe, kind)
    root = storage.absolute(cache_root)
    # another corpus (or another model): another cache
    final = storage.join(root, f"{key}-{clips_digest(features_dir)}")
    if storage.exists(storage.join(final, INFO_FILE)):
        log.info("feature cache %s already built; reusing it", final)
        return _open(final)
    work = storage.join(root, f".building-{key}-{uuid.uuid4().hex[:8]}")
    model_dir = storage.join(work, "model")  # where the actors, on any node, load it from
    with storage.staged(model_dir) as local:
        save_model(net.model, fe, local)
    if use_gpu is None:
        use_gpu = resources.cluster_has_gpu()
    data_dir = storage.join(work, DATA_DIR)
    if not use_gpu and num_actors is None and count_rows(features_dir) <= IN_PROCESS_MAX_CLIPS:
        _build_in_process(features_dir, str(model_dir), kind, data_dir, batch_size)
    else:
        if num_actors is None:
            num_actors = resources.feature_cache_actors(use_gpu)
        _build_on_ray(features_dir, str(model_dir), kind, data_dir, batch_size, num_actors,
                      use_gpu)  # fmt: skip
    num_clips = count_rows(data_dir)
    storage.delete(model_dir)
    info = {"key": key, "kind": kind, "model": cfg.model, "num_clips": num_clips}
    storage.write_text(storage.join(work, INFO_FILE), json.dumps(info, indent=2))
    storage.replace_dir(work, final)
    log.info("feature cache %s: %d clips (%s)", final, num_clips, kind)
    return _open(final)


def _build_on_ray(features_dir, model_dir: str, kind: str, data_dir: str, batch_size: int,
                  num_actors: int, use_gpu: bool) -> None:  # fmt: skip
    """The cache's Parquet files, computed by ``num_actors`` actors of Ray Data."""
    import ray.data

    from ser_ray.distributed.ingest import parquet_dataset

    # RAY. The reads, the model's actors and the writes reserve no CPU, so the build runs even
    # while a failed trainer's placement groups hold CPUs (ser_ray.distributed.resources).
    ds = parquet_dataset(features_dir, INPUT_COLUMNS)
    ds.context.execution_options.preserve_order = True  # the files' rows in the input's order
    with console.remote_args_without_deprecation():
        ds = ds.map_batches(
            ClipFeatureUDF,
            fn_constructor_kwargs={"model_dir": model_dir, "kind": kind, "use_gpu": use_gpu},
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **resources.feature_cache_actor(use_gpu),
        )
    ds.write_parquet(data_dir, ray_remote_args=resources.feature_cache_write(use_gpu))


def _build_in_process(features_dir, model_dir: str, kind: str, data_dir: str,
                      batch_size: int) -> None:  # fmt: skip
    """The cache's Parquet file, computed here by the actors' callable, batch after batch,
    on as many torch threads as an actor has (so the same values)."""
    threads = torch.get_num_threads()
    try:
        compute = ClipFeatureUDF(model_dir, kind)
        filesystem, files = parquet_files(features_dir)
        table = pa.concat_tables(
            pq.read_table(name, columns=INPUT_COLUMNS, filesystem=filesystem) for name in files
        )
        parts = [
            compute(table.slice(start, batch_size))
            for start in range(0, table.num_rows, batch_size)
        ]
    finally:
        torch.set_num_threads(threads)
    storage.make_dirs(data_dir)
    filesystem, part = storage.filesystem_of(storage.join(data_dir, "part-0.parquet"))
    pq.write_table(pa.concat_tables(parts), part, filesystem=filesystem)


def cached_values(cache: FeatureCache) -> dict[str, np.ndarray]:
    """Every clip's cached values, flat (row-major ``feature_rows x feature_dim``), by path:
    for a ``pooled`` cache the SVM's ``ssl`` features (:data:`ser_ray.models.svm.SSL_COLUMN`).
    """

    dataset, _ = storage.speaker_rows(cache.path, None)
    table = dataset.to_table(columns=["path", "features"])
    return dict(zip(table.column("path").to_pylist(), list_column(table, "features"), strict=True))


def speaker_normalised_cache(
    cache: FeatureCache, group_of: Mapping[str, object] | None = None
) -> FeatureCache:
    """``cache`` (pooled layers) with every clip's values z-normalised over its speaker's
    clips (:func:`ser_ray.features.speaker_norm.speaker_normalize`: each speaker's own
    statistics, from audio, never labels), beside it in ``<its folder>-spknorm/``; reused
    when there. It keeps the cache's key: the same frozen encoder made it. ``group_of``:
    each clip's normalisation group by path
    (:func:`ser_ray.features.speaker_norm.normalisation_groups`; None: its speaker).

    One table in the driver's memory (clips x layers x hidden floats, 0.4 GB for 10,000
    clips of a base-size encoder)."""
    if cache.kind != "pooled":
        raise ValueError(f"speaker normalisation needs pooled layers, not a {cache.kind} cache")
    root = storage.parent(storage.parent(cache.path))
    name = f"{storage.base_name(storage.parent(cache.path))}-spknorm"
    final = storage.join(root, name)
    if storage.exists(storage.join(final, INFO_FILE)):
        return _open(final)
    table = storage.speaker_rows(cache.path, None)[0].to_table()
    values = np.stack(list_column(table, "features"))
    paths = table.column("path").to_pylist()
    speakers = table.column("actor").to_pylist()
    groups = [group_of[p] for p in paths] if group_of is not None else speakers
    normalised = speaker_normalize(values, groups, paths)
    flat = pa.array(normalised.astype(np.float32).reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, len(flat) + 1, values.shape[1], dtype=np.int32))
    column = table.schema.get_field_index("features")
    table = table.set_column(column, "features", pa.ListArray.from_arrays(offsets, flat))
    work = storage.join(root, f".building-{name}-{uuid.uuid4().hex[:8]}")
    storage.make_dirs(storage.join(work, DATA_DIR))
    filesystem, part = storage.filesystem_of(storage.join(work, DATA_DIR, "part-0.parquet"))
    pq.write_table(table, part, filesystem=filesystem)
    info = {"key": cache.key, "kind": cache.kind, "num_clips": table.num_rows,
            "speaker_norm": True}  # fmt: skip
    storage.write_text(storage.join(work, INFO_FILE), json.dumps(info, indent=2))
    storage.replace_dir(work, final)
    log.info("speaker-normalised feature cache %s: %d clips", final, table.num_rows)
    return _open(final)
