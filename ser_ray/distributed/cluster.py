"""The cluster a job runs on: its nodes, whether they all see the run location, and the
resources an autoscaler is asked for before the plan is made.

On one machine every file is where the driver left it. On a cluster, tasks, actors and trials
run on other nodes and read and write the run location (``--out``) and the corpus there, so
a folder only the driver's disk holds breaks a run late and confusingly (a trial that finds no
features, results written to a disk nobody reads). :func:`check_reachable` proves, before any
heavy work, that every alive node reads (and, for the run location, writes) the same files
the driver does: the driver writes a marker with a random token, one tiny task pinned to each
node reads it back and answers, and a location some node cannot see becomes one line
(:class:`RunLocationError`) naming the location, the nodes and the fix.

A cluster with an autoscaler may start with fewer nodes than the run asks for:
:func:`wait_for_resources` asks the autoscaler for them (``request_resources``) and waits a
bounded time, or says in one line (:class:`ClusterTooSmallError`) what was asked, what is
there and what to change. Without an autoscaler, Ray's ``request_resources`` only stores the
request in the GCS (nothing reads it), so the wait simply runs out.

Only the driver calls these (Ray initialised). The per-node probe (:func:`probe_location`) is
plain storage code, and the error is built by a pure function (:func:`reach_error`), so both
are tested without a second node.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from ser_ray.common import storage
from ser_ray.common.errors import UserError

logger = logging.getLogger(__name__)

#: How long the per-node probe tasks may take before a node counts as not answering.
PROBE_TIMEOUT_S = 60.0
#: Prefix of the marker files written into a writable location (hidden: Parquet readers and
#: listings of the run skip names starting with '.').
MARKER_PREFIX = ".ser_ray_reach-"
#: What to do about a location some node cannot see.
LOCATION_FIX = (
    "on a folder every node mounts (NFS, EFS, a Kubernetes volume) "
    "or on object storage (s3://…, gs://…)"
)
#: How many nodes one error line names before it says "and N more".
MAX_NAMED_NODES = 5
#: How much of an exception's first line an error line quotes.
MAX_PROBLEM_CHARS = 160


class RunLocationError(UserError, ValueError):
    """A user's mistake about where files live (e.g. ``--out`` on a disk only the driver
    has); the job prints it as one line, without a traceback."""


class ClusterTooSmallError(UserError, ValueError):
    """The cluster does not have (and did not get in time) the CPUs/GPUs the run asks for;
    one line saying what was asked, what is there and what to change."""


# --- nodes ---------------------------------------------------------------------------------

_joined_override: bool | None = None


def note_joined(joined: bool | None) -> None:
    """Say whether the driver joined an existing cluster (True) or started its own local
    instance (False), overriding what :func:`joined_existing_cluster` reads from Ray; None
    goes back to reading it. Optional: Ray 2.60 tells it itself; for tests and for a driver
    that knows better."""
    global _joined_override
    _joined_override = joined


def joined_existing_cluster() -> bool:
    """Whether this driver joined a cluster it did not start (``ray.init(address=...)``,
    ``RAY_ADDRESS``, Ray Client) rather than starting a local instance itself.

    ``ray.init`` starting a local instance makes its node with ``ray_init_cluster=True``
    (``ray._private.worker._global_node``); joining one makes a connect-only node with it
    False, and Ray Client has no node in the driver at all. If that private attribute is
    ever gone, "joined" is the answer: it only makes the checks stricter."""
    if _joined_override is not None:
        return _joined_override
    try:
        from ray._private import worker

        node = worker._global_node
    except (ImportError, AttributeError):  # pragma: no cover - Ray's internals moved
        return True
    return node is None or not bool(getattr(node, "ray_init_cluster", False))


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the Ray cluster: ``ray.nodes()`` entries with ``Alive`` True, each
    with ``node_id``, ``ip`` (``NodeManagerAddress``), ``hostname`` (``NodeManagerHostname``,
    "" when Ray has none) and ``label`` (how errors name it) added; sorted by IP."""
    import ray

    nodes = [
        {
            **entry,
            "node_id": entry["NodeID"],
            "ip": entry.get("NodeManagerAddress", ""),
            "hostname": entry.get("NodeManagerHostname", "") or "",
        }
        for entry in ray.nodes()
        if entry.get("Alive")
    ]
    nodes.sort(key=lambda n: (n["ip"], n["node_id"]))
    return _labelled(nodes)


def _labelled(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``nodes`` with a ``label``: "hostname (IP)", plus the node id's start where several
    nodes share one (several Ray nodes on one machine)."""
    labels = [_node_label(n) for n in nodes]
    return [
        {**n, "label": f"{label} node {n['node_id'][:8]}" if labels.count(label) > 1 else label}
        for n, label in zip(nodes, labels, strict=True)
    ]


def _node_label(node: Mapping[str, Any]) -> str:
    ip, hostname = node.get("ip", ""), node.get("hostname", "")
    if hostname and ip and hostname != ip:
        return f"{hostname} ({ip})"
    return hostname or ip or str(node.get("node_id", "?"))[:8]


def spans_nodes() -> bool:
    """Whether work may run on another machine than the driver: the cluster has more than
    one alive node, or the driver joined an existing cluster (an autoscaler may add nodes
    later, and a joined cluster's one node need not be the driver's machine)."""
    return len(alive_nodes()) > 1 or joined_existing_cluster()


# --- can every node see a location? ---------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One location every node must see as the driver does.

    ``writable``: the job writes there (the run location): ``expected`` is the random token
    of the marker the driver wrote (:func:`marker_path`), and each node that reads it writes
    its own reply next to it (:func:`reply_path`). Read-only (a corpus): ``expected`` is the
    driver's :func:`fingerprint` of the location (a folder's entry names, a file's size).
    """

    name: str
    location: str
    writable: bool
    expected: str


def marker_path(check: Check) -> str:
    """The driver's marker file in a writable location."""
    return storage.join(check.location, f"{MARKER_PREFIX}{check.expected}")


def reply_path(check: Check, node_id: str) -> str:
    """The file a node writes next to the driver's marker, proving it can write there and
    that the driver sees what it writes."""
    return storage.join(check.location, f"{MARKER_PREFIX}{check.expected}-{node_id[:16]}")


def fingerprint(location: str) -> str:
    """What a read-only location looks like from here: "missing", a file's size, or a
    folder's number of entries and a hash of their names (a node with its own copy of a
    folder of the same name usually differs in one of them). Reachability markers are left
    out: a corpus inside the run location must not differ by the probes' own files."""
    filesystem, path = storage.filesystem_of(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.is_file:
        return f"file of {info.size} bytes"
    names = [n for n in storage.list_names(location) if not n.startswith(MARKER_PREFIX)]
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return f"folder of {len(names)} entries ({digest})"


def probe_location(check: Check, node_id: str) -> str:
    """What is wrong with ``check`` as seen from this process's node: "" when it sees the
    location as the driver does; else a short phrase for the error line. Runs inside the
    probe task on each node (no Ray here)."""
    try:
        if not check.writable:
            seen = fingerprint(check.location)
            if seen == check.expected:
                return ""
            if seen == "missing":
                return "nothing is there"
            return f"it holds something else there ({seen}; the driver sees a {check.expected})"
        marker = marker_path(check)
        if not storage.exists(marker):
            return "the driver's marker file is not there"
        if storage.read_text(marker).strip() != check.expected:
            return "the driver's marker file there holds another token"
        storage.write_text(reply_path(check, node_id), check.expected)
        return ""
    except Exception as error:  # credentials, permissions, network: all "cannot see"
        return first_line(error)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception (a Ray task's error: of its
    cause), cut to :data:`MAX_PROBLEM_CHARS`, for one-line reports."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    lines = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return line if len(line) <= MAX_PROBLEM_CHARS else line[: MAX_PROBLEM_CHARS - 1] + "…"


def _probe_node(checks: Sequence[Check], node_id: str) -> list[str]:
    """The probe task's body: one problem ("" for none) per check, seen from this node."""
    return [probe_location(check, node_id) for check in checks]


def probe_nodes(
    checks: Sequence[Check], nodes: Sequence[Mapping[str, Any]], timeout_s: float = PROBE_TIMEOUT_S
) -> dict[str, list[str]]:
    """node label -> one problem per check ("" for none), from one tiny task pinned to each
    node (``num_cpus=0``, so it runs while the node's CPUs are busy; never retried). A node
    whose task raised gets the exception's first line for every check; one that did not
    answer within ``timeout_s`` gets that, and its task is cancelled."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    results: dict[str, list[str]] = {}
    refs = {}
    for node in nodes:
        try:
            refs[node["label"]] = _submit(task, checks, node["node_id"])
        except Exception as error:  # e.g. a node id Ray refuses
            results[node["label"]] = [first_line(error)] * len(checks)
    ready = set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)[0])
    for label, ref in refs.items():
        if ref not in ready:
            _cancel(ray, ref)
            results[label] = [f"it did not answer within {timeout_s:g} s"] * len(checks)
            continue
        try:
            results[label] = list(ray.get(ref))
        except Exception as error:  # the task itself failed: ser_ray missing, node gone, …
            results[label] = [first_line(error)] * len(checks)
    return {node["label"]: results[node["label"]] for node in nodes}


def _submit(task: Any, checks: Sequence[Check], node_id: str) -> Any:
    """Start the probe on the node ``node_id`` and nowhere else (``soft=False``: a node that
    is gone fails the task instead of sending it elsewhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        name="ser_ray_reach_probe",
    ).remote(list(checks), node_id)


def _cancel(ray: Any, ref: Any) -> None:
    """Cancel a probe that did not answer (best effort: it may have just finished)."""
    try:
        ray.cancel(ref, force=True)
    except Exception as error:
        logger.debug("could not cancel a reachability probe: %s", error)


def _check_replies(
    checks: Sequence[Check], nodes: Sequence[Mapping[str, Any]], results: dict[str, list[str]]
) -> None:
    """Mark, in ``results``, nodes that wrote their reply into a writable location but whose
    reply the driver cannot read back (the node writes somewhere the driver does not see)."""
    for node in nodes:
        problems = results[node["label"]]
        for i, check in enumerate(checks):
            if not check.writable or problems[i]:
                continue
            try:
                found = storage.read_text(reply_path(check, node["node_id"])).strip()
            except Exception:
                found = ""
            if found != check.expected:
                problems[i] = "what it writes there does not reach the driver"


def reach_error(
    checks: Sequence[Check], results: Mapping[str, Sequence[str]]
) -> RunLocationError | None:
    """The one-line error for the locations some node cannot see (None when every node sees
    every location): each location, its nodes grouped by what went wrong, and the fix.
    ``results``: node label -> one problem per check ("" for none), as :func:`probe_nodes`
    returns."""
    parts = []
    names = []
    for i, check in enumerate(checks):
        by_problem: dict[str, list[str]] = {}
        for label, problems in results.items():
            if problems[i]:
                by_problem.setdefault(problems[i], []).append(label)
        if not by_problem:
            continue
        names.append(check.name)
        where = "; ".join(f"on {_named(labels)}: {p}" for p, labels in by_problem.items())
        parts.append(f"{check.name} {check.location} is not seen by every node ({where})")
    if not parts:
        return None
    return RunLocationError(f"{'; '.join(parts)}. Put {' and '.join(names)} {LOCATION_FIX}")


def _named(labels: Sequence[str]) -> str:
    """Up to :data:`MAX_NAMED_NODES` node labels, then how many more."""
    shown = ", ".join(labels[:MAX_NAMED_NODES])
    rest = len(labels) - MAX_NAMED_NODES
    return f"{shown} and {rest} more" if rest > 0 else shown


def _plan_checks(writable: Mapping[str, str], readable: Mapping[str, str]) -> list[Check]:
    """The checks for these locations (driver side: writes each writable location's marker;
    a read-only location missing here is left to the job's own check, which names it)."""
    checks = []
    for name, location in writable.items():
        check = Check(name, storage.absolute(location), True, uuid.uuid4().hex)
        checks.append(check)  # before writing: a half-written marker is deleted too
        storage.write_text(marker_path(check), check.expected)
    for name, location in readable.items():
        seen = fingerprint(storage.absolute(location))
        if seen == "missing":
            logger.debug("%s %s is missing on the driver; not probed", name, location)
            continue
        checks.append(Check(name, storage.absolute(location), False, seen))
    return checks


def _clean_up(checks: Sequence[Check], nodes: Sequence[Mapping[str, Any]]) -> None:
    """Delete the markers and replies (best effort: a failure here must not hide the
    answer)."""
    for check in checks:
        if not check.writable:
            continue
        paths = [marker_path(check)] + [reply_path(check, n["node_id"]) for n in nodes]
        for path in paths:
            try:
                storage.delete(path)
            except Exception as error:
                logger.debug("could not delete %s: %s", path, error)


def check_reachable(
    writable: Mapping[str, str] | None = None,
    readable: Mapping[str, str] | None = None,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """Refuse, before any heavy work, a location some alive node cannot see as the driver
    does: ``writable`` (description -> location the job writes, e.g. ``{"--out": out}``)
    must be readable and writable from every node, with each node's writes visible to the
    driver; ``readable`` (e.g. ``{"--data-dir": corpus}``) must hold the same entries on
    every node. Nothing to do (nothing written) on a single-node cluster. Raises
    :class:`RunLocationError` (one line: the location, the nodes, the fix)."""
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    checks: list[Check] = []
    results: dict[str, list[str]] = {}
    try:
        checks = _plan_checks(writable or {}, readable or {})
        if not checks:
            return
        logger.info("checking that %d nodes see %s", len(nodes), ", ".join(c.name for c in checks))
        results = probe_nodes(checks, nodes, timeout_s)
        _check_replies(checks, nodes, results)
    finally:
        _clean_up(checks, nodes)
    error = reach_error(checks, results)
    if error is not None:
        raise error


# --- waiting for an autoscaler ------------------------------------------------------------


def _print_now(line: str) -> None:
    print(line, flush=True)


def _amounts(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU{'' if cpus == 1 else 's'}/{gpus:g} GPU{'' if gpus == 1 else 's'}"


def _has(resources: Mapping[str, float], cpus: float, gpus: float) -> bool:
    return resources.get("CPU", 0.0) >= cpus and resources.get("GPU", 0.0) >= gpus


def unit_bundles(cpus: float, gpus: float) -> list[dict[str, float]]:
    """What the autoscaler is asked for: ``cpus`` one-CPU and ``gpus`` one-GPU bundles
    (rounded up), which any node shape can hold; one bundle of all of them would need a single
    node that big."""
    return [{"CPU": 1.0}] * math.ceil(cpus) + [{"GPU": 1.0}] * math.ceil(gpus)


def _request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for ``bundles`` (an empty list withdraws the request).
    A hint only: without an autoscaler Ray 2.60 stores it in the GCS and nothing reads it."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as error:  # a hint: never the reason a run fails
        logger.warning("could not ask the autoscaler for resources: %s", first_line(error))


def too_small_error(
    cpus: float,
    gpus: float,
    have: Mapping[str, float],
    *,
    waited_s: float,
    reason: str,
    wait_flag: str,
) -> ClusterTooSmallError:
    """The one-line error for a cluster that lacks ``cpus``/``gpus`` after ``waited_s``."""
    there = _amounts(have.get("CPU", 0.0), have.get("GPU", 0.0))
    return ClusterTooSmallError(
        f"this run asks for {_amounts(cpus, gpus)} ({reason}) but the cluster has {there} "
        f"after waiting {waited_s:g} s; lower --concurrent-folds or --gpus-per-fold, add "
        f"nodes, or raise {wait_flag}"
    )


def wait_for_resources(
    cpus: float,
    gpus: float,
    *,
    timeout_s: float,
    reason: str,
    poll_s: float = 2.0,
    print_fn: Callable[[str], None] = _print_now,
    bundles: list[dict[str, float]] | None = None,
    wait_flag: str = "--cluster-wait-s",
) -> dict[str, float]:
    """``ray.cluster_resources()`` once it has at least ``cpus`` CPUs and ``gpus`` GPUs: at
    once when it has; else after asking the autoscaler for them (``bundles``, default
    :func:`unit_bundles`) and polling every ``poll_s`` for up to ``timeout_s`` seconds, with
    one line before and one after. The request stays while the run goes on (nodes that idle
    through the SVM stages would otherwise be removed before the folds start): the run
    withdraws it when it ends (:func:`release_requested_resources`), and it is withdrawn here
    when the nodes do not come: :class:`ClusterTooSmallError` (``reason``: why the run needs
    them; ``wait_flag``: the flag that sets ``timeout_s``)."""
    import ray

    have = ray.cluster_resources()
    if _has(have, cpus, gpus):
        return have
    if timeout_s <= 0:
        raise too_small_error(cpus, gpus, have, waited_s=0, reason=reason, wait_flag=wait_flag)
    missing = _amounts(max(cpus - have.get("CPU", 0.0), 0), max(gpus - have.get("GPU", 0.0), 0))
    _request(bundles if bundles is not None else unit_bundles(cpus, gpus))
    print_fn(f"waiting up to {timeout_s:g} s for the cluster to add {missing} ({reason})…")
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            release_requested_resources()
            raise too_small_error(
                cpus, gpus, have, waited_s=timeout_s, reason=reason, wait_flag=wait_flag
            )
        time.sleep(min(poll_s, left))
        have = ray.cluster_resources()
        if _has(have, cpus, gpus):
            there = _amounts(have.get("CPU", 0.0), have.get("GPU", 0.0))
            print_fn(f"cluster now has {there}")
            return have


def release_requested_resources() -> None:
    """Withdraw this run's autoscaler request (Ray keeps one until it is overridden, even
    after the job ends, which would keep an autoscaled cluster large)."""
    _request([])
