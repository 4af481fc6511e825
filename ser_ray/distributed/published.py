"""Folders every node can read: driver-side models and the demo corpus, published to the run
location.

A fold trial, a feature-cache actor or a TAPT task loads its encoder by a name
(``load_model``): a hub id, ``demo-random``, or a folder; featurizing tasks read the clips of
the corpus. A folder on the driver's own disk (the demo encoder and the demo corpus in
``~/.cache/ser_ray``, a ``--model`` folder, a hub model the driver downloaded) exists on the
driver's machine only; on a cluster that spans nodes the driver publishes it once into the run
location, under ``OUT/<kind>/<name>-<content key>``, and every node reads that copy (a model
through :func:`ser_ray.common.storage.node_local`, one copy per node). The content key makes a
published copy immutable: a changed folder is another copy.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ser_ray.common import storage
from ser_ray.distributed import cluster
from ser_ray.models.ssl import RANDOM_DEMO_MODEL

log = logging.getLogger(__name__)

DONE_FILE = "_PUBLISHED"  # written last: the copy is complete


def published_model(model: str, run_location: str) -> str:
    """Where every node of this cluster loads ``model`` from: as given on a single machine,
    for a URI, and for ``demo-random`` (built by each loader); on a cluster that spans nodes a
    local folder (or a hub id, downloaded here first) is published to the run location."""
    if model == RANDOM_DEMO_MODEL or storage.is_uri(model) or not cluster.spans_nodes():
        return model
    folder = Path(model) if Path(model).is_dir() else _downloaded(model)
    if folder is None:
        return model
    return publish(folder, run_location, "models")


def published_corpus(folder: Path, run_location: str) -> str:
    """Where every node reads the local corpus ``folder`` (the demo corpus) from: the folder
    itself on one machine, else its copy in ``OUT/corpora``."""
    return publish(folder, run_location, "corpora") if cluster.spans_nodes() else str(folder)


def publish(folder: Path, run_location: str, kind: str) -> str:
    """Copy the local ``folder`` to ``run_location/<kind>/<name>-<content key>`` unless a
    complete copy is there; returns that location."""
    target = storage.join(run_location, kind, f"{folder.name}-{content_key(folder)}")
    if storage.exists(storage.join(target, DONE_FILE)):
        return target
    storage.upload(folder, target)
    storage.write_text(storage.join(target, DONE_FILE), str(folder))
    log.info("%s published for every node: %s", folder, target)
    return target


def content_key(folder: Path) -> str:
    """12 hex digits of a hash of the folder's files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _downloaded(hub_id: str) -> Path | None:
    """The driver's copy of a hub model (downloaded here once), or None when the hub cannot
    give one (each node then fetches it itself, as ``from_pretrained`` does)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id))
    except Exception as err:  # offline, gated, or not a hub id: the nodes try themselves
        log.warning("%s: not downloaded by the driver (%s); each node fetches it", hub_id, err)
        return None
