"""Real multi-node Ray clusters and an S3 endpoint for tests, on one machine, offline.

:func:`two_node_cluster` starts a head node and a worker node with ``ray start`` on 127.0.0.1,
each in its own process group and mount namespace. In the worker node's, ``private_dir`` is
covered by an empty tmpfs: files the test process writes there are invisible to the worker node
(as on a second machine), while everything else (the repository, the venv, ``/tmp``,
``shared_dir``) is shared. :func:`s3_server` starts moto's S3 server for data that
every node must read (``s3://`` URIs via ``pyarrow.fs``).

Ray drivers run in subprocesses (:meth:`TwoNodeCluster.run_driver`), so the pytest process stays
free for the session's local Ray instance (the ``ray_local`` fixture). The cluster uses token
authentication with its own random token, handed to nodes and drivers through ``RAY_AUTH_MODE``
and ``RAY_AUTH_TOKEN``; ``~/.ray/auth_token`` is neither read nor written.

Every node runs in its own mount namespace (``unshare -m``), which all its processes inherit
and none leaves: cleanup never runs ``ray stop`` (which stops every Ray instance on the
machine), it kills the node's process group and then every process left in the node's mount
namespace (Ray's workers run in process groups of their own and rename themselves ``ray::...``,
so neither the process group nor the command line nor ``/proc/PID/environ`` finds them all).

Needs Linux, root (``unshare -m``, ``mount``) and the ``unshare`` program (util-linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Node environment defaults (``env`` overrides them): no usage stats, and a dead node is
#: noticed by the GCS in about 1.5 s instead of about 15 s.
NODE_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
}

#: Variables of the test process that must not leak into nodes or drivers: an address would
#: redirect them to another cluster, a token path would shadow this cluster's token.
_SCRUBBED = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def _base_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env


def _live_pids() -> Iterator[tuple[int, int]]:
    """(pid, pgid) of every process that is not a zombie."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        if fields[0] not in "ZX":
            yield int(entry), int(fields[2])


def mount_ns(pid: int | str = "self") -> str | None:
    """The mount namespace of a process, e.g. ``mnt:[4026532841]`` (None if it is gone)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def pids_in_mount_ns(ns: str) -> list[int]:
    """Live processes in mount namespace ``ns`` (see :func:`mount_ns`)."""
    return [pid for pid, _ in _live_pids() if mount_ns(pid) == ns]


def pgid_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    return any(g == pgid for _, g in _live_pids())


def kill_process_group(
    pgid: int,
    proc: subprocess.Popen | None = None,
    ns: str | None = None,
    grace_s: float = 5.0,
) -> None:
    """SIGTERM process group ``pgid`` (if ``grace_s`` > 0), then SIGKILL it and every process in
    mount namespace ``ns``; returns once none is left (reaping ``proc``, its leader)."""

    def alive() -> bool:
        if proc is not None:
            proc.poll()
        return pgid_alive(pgid) or bool(ns and pids_in_mount_ns(ns))

    if grace_s > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in pids_in_mount_ns(ns) if ns else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        if not alive():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid} (mount namespace {ns}) survived SIGKILL")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Drivers and node listings: Python subprocesses with the cluster's environment.

_NODES_SCRIPT = r"""
import json, sys, time
from ray._raylet import GcsClient
from ray._private.gcs_utils import GcsNodeInfo

address, want, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
client = GcsClient(address=address)
deadline = time.monotonic() + timeout_s
while True:
    nodes = []
    for node_id, info in client.get_all_node_info(timeout=10).items():
        nodes.append({
            "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
            "alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE,
            "is_head": bool(info.is_head_node),
            "temp_dir": info.temp_dir,
            "ip": info.node_manager_address,
            "resources": dict(info.resources_total),
        })
    n_alive = sum(n["alive"] for n in nodes)
    if want < 0 or n_alive == want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(nodes))
"""


def last_json_line(text: str) -> Any:
    """The last line of ``text`` that parses as JSON (drivers print their result last)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line[:1] in "{[":
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    raise ValueError(f"no JSON line in output:\n{text[-3000:]}")


@dataclass
class _Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    mnt_ns: str | None = None  # its own mount namespace, once unshare has made it
    killed: bool = False  # by kill_worker or stop, on purpose

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """Its live processes: its process group and everything in its mount namespace."""
        return sorted(
            {pid for pid, g in _live_pids() if g == self.pgid}
            | set(pids_in_mount_ns(self.mnt_ns) if self.mnt_ns else ())
        )

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class TwoNodeCluster:
    """A running head node (and usually one worker node); made by :func:`two_node_cluster`.

    ``env`` holds the variables a driver subprocess needs on top of ``os.environ``:
    ``RAY_ADDRESS``, ``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN`` and the ``env`` given to
    :func:`two_node_cluster` (e.g. S3 settings). :meth:`driver_environ` is the full mapping.
    """

    address: str
    env: dict[str, str]
    private_dir: Path
    shared_dir: Path | None
    cluster_id: str
    token: str
    _node_env: dict[str, str]
    _root: Path
    _worker_cpus: int
    _object_store_bytes: int
    _head: _Node | None = None
    _workers: list[_Node] = field(default_factory=list)
    _n_started: int = 0

    # -- process groups ------------------------------------------------------------------------
    @property
    def head_pgid(self) -> int:
        assert self._head is not None
        return self._head.pgid

    @property
    def worker_pgid(self) -> int | None:
        """Process group of the newest worker node still running, else None."""
        alive = [w for w in self._workers if w.proc.poll() is None]
        return alive[-1].pgid if alive else None

    @property
    def all_pgids(self) -> list[int]:
        """Every process group this cluster started (head and worker nodes, killed or not)."""
        return [n.pgid for n in ([self._head] if self._head else []) + self._workers]

    # -- drivers --------------------------------------------------------------------------------
    def driver_environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """``os.environ`` (less stray Ray address/auth variables) + :attr:`env` + ``extra``."""
        return {**_base_environ(), **self.env, **(extra or {})}

    def run_driver(
        self,
        script: str | Sequence[str],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout_s: float = 300,
        cwd: str | os.PathLike | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run a Python driver against this cluster in a subprocess (text output captured).

        ``script`` is Python source (run with ``python -c``; ``ray.init()`` or
        ``ray.init(address=os.environ["RAY_ADDRESS"])`` connects) or an argv list, where a
        first item ending in ``.py`` is run with this interpreter, e.g.
        ``["jobs/kfold.py", "--address", cluster.address]``. ``cwd`` defaults to the repository.
        With ``check`` a non-zero exit raises ``AssertionError`` with the output's tail.
        """
        if isinstance(script, str):
            argv = [sys.executable, "-c", script, *args]
        else:
            argv = list(script) + list(args)
            if argv and argv[0].endswith(".py"):
                argv.insert(0, sys.executable)
        proc = subprocess.run(
            argv,
            env=self.driver_environ(env),
            cwd=str(cwd or REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"driver exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                f"\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        return proc

    def run_driver_json(self, script: str | Sequence[str], **kwargs) -> Any:
        """:meth:`run_driver`, then the last JSON line the driver printed to stdout."""
        return last_json_line(self.run_driver(script, **kwargs).stdout)

    @contextlib.contextmanager
    def connect(self, **init_kwargs) -> Iterator[Any]:
        """``ray.init`` this cluster from the calling process (then shut down, env restored).

        Refuses when the process is already connected to Ray (e.g. ``ray_local`` ran in
        this pytest session): prefer :meth:`run_driver` in test suites.
        """
        import ray

        if ray.is_initialized():
            raise RuntimeError(
                "this process is already connected to Ray (the ray_local fixture?): "
                "use run_driver() instead of connect()"
            )
        saved = {k: os.environ.get(k) for k in [*self.env, *_SCRUBBED]}
        for k in _SCRUBBED:
            os.environ.pop(k, None)
        os.environ.update(self.env)
        _reset_ray_auth_cache()
        try:
            init_kwargs.setdefault("log_to_driver", False)
            yield ray.init(address=self.address, **init_kwargs)
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_ray_auth_cache()

    # -- nodes ----------------------------------------------------------------------------------
    def nodes(self, wait_for_alive: int = -1, timeout_s: float = 0) -> list[dict]:
        """Every node the GCS knows (dead ones too): dicts with ``node_id``, ``alive``,
        ``is_head``, ``temp_dir``, ``ip``, ``resources``; read in a subprocess (~1-2 s),
        so the calling process needs no Ray connection. With ``wait_for_alive`` >= 0 it
        polls until exactly that many nodes are alive or ``timeout_s`` passed."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _NODES_SCRIPT, self.address, str(wait_for_alive),
             str(timeout_s)],
            env=self.driver_environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s + 60
        try:
            while proc.poll() is None:
                # A node that exits while we wait for it will not come: fail now, with its log.
                dead = [n for n in self._all_nodes() if n.proc.poll() is not None and not n.killed]
                if dead or time.monotonic() > deadline:
                    proc.kill()
                    why = "timed out" if not dead else f"{dead[0].name} node exited"
                    raise RuntimeError(
                        f"{why} while listing nodes"
                        + "".join(f"\n--- {n.name} log ---\n{n.log_tail()}" for n in dead)
                    )
                time.sleep(0.1)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"listing nodes failed:\n{err[-4000:]}")
        return last_json_line(out)

    def node_ids(self) -> list[str]:
        """Hex ids of the alive nodes."""
        return [n["node_id"] for n in self.nodes() if n["alive"]]

    def wait_for_nodes(self, n: int, timeout_s: float = 30) -> list[dict]:
        """Wait until exactly ``n`` nodes are alive; returns the alive nodes (see :meth:`nodes`)."""
        nodes = self.nodes(wait_for_alive=n, timeout_s=timeout_s)
        alive = [x for x in nodes if x["alive"]]
        if len(alive) != n:
            raise TimeoutError(
                f"{len(alive)} alive nodes, not {n}, after {timeout_s} s: {nodes}"
                + "".join(f"\n--- {w.name} log ---\n{w.log_tail()}" for w in self._all_nodes())
            )
        return alive

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["alive"] and n["is_head"])

    def worker_node_id(self) -> str | None:
        """Node id of the newest running worker node (None when none runs)."""
        alive = [w for w in self._workers if w.proc.poll() is None]
        if not alive:
            return None
        want = str(alive[-1].temp_dir)
        for n in self.nodes():
            if n["alive"] and n["temp_dir"] == want:
                return n["node_id"]
        return None

    @property
    def temp_dirs(self) -> list[Path]:
        """The nodes' Ray temp dirs and the dir of their ``ray start`` logs."""
        return [self._root, *(n.temp_dir for n in self._all_nodes())]

    def _all_nodes(self) -> list[_Node]:
        return ([self._head] if self._head else []) + self._workers

    def _spawn(self, name: str, argv: list[str], temp_dir: Path) -> _Node:
        log = self._root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=self._node_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid: its own session and process group
                cwd=str(REPO_ROOT),
            )
        node = _Node(name=name, proc=proc, temp_dir=temp_dir, log=log)
        # unshare makes the namespace within milliseconds; record it for cleanup.
        ours, deadline = mount_ns(), time.monotonic() + 10
        while node.mnt_ns is None:
            ns = mount_ns(proc.pid)
            if ns is not None and ns != ours:
                node.mnt_ns = ns
            elif proc.poll() is not None or time.monotonic() > deadline:
                kill_process_group(proc.pid, proc, grace_s=0)
                raise RuntimeError(f"{name} node: unshare failed\n{node.log_tail()}")
            else:
                time.sleep(0.005)
        return node

    def _ray_start_args(self, temp_dir: Path) -> list[str]:
        return [
            shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray",
            "start",
            "--block",
            "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(temp_dir),
            "--object-store-memory", str(self._object_store_bytes),
            "--dashboard-agent-listen-port", str(free_port()),
            "--disable-usage-stats",
            "--log-style", "record",
            "--log-color", "false",
        ]  # fmt: skip

    def _spawn_head(self, cpus: int, port: int) -> None:
        temp_dir = Path(f"{self._root}-h")
        argv = self._ray_start_args(temp_dir) + [
            "--head",
            "--port", str(port),
            "--num-cpus", str(cpus),
            "--include-dashboard", "false",  # still a minimal dashboard process: port below
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
        ]  # fmt: skip
        # Its own mount namespace only tags its processes for cleanup; "slave" propagation
        # still shows it the machine's later mounts.
        argv = ["unshare", "-m", "--propagation", "slave", *argv]
        self._head = self._spawn("head", argv, temp_dir)

    def _wait_head(self, timeout_s: float) -> None:
        assert self._head is not None
        host, port = self.address.rsplit(":", 1)
        try:
            _wait_port(host, int(port), timeout_s, self._head.proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"head node did not start: {e}\n{self._head.log_tail()}") from e

    def start_worker(
        self, num_cpus: int | None = None, timeout_s: float = 30, wait: bool = True
    ) -> int:
        """Start a worker node (private ``private_dir``, see module doc) and (with ``wait``)
        wait until it has joined; returns its process group id. Can be called again after
        :meth:`kill_worker` (a fresh node with a fresh, empty ``private_dir``) or to add more
        worker nodes."""
        n_alive = sum(1 for w in self._workers if w.proc.poll() is None) + 1
        self._n_started += 1
        name = f"w{self._n_started}"
        temp_dir = Path(f"{self._root}-{name}")
        ray_argv = self._ray_start_args(temp_dir) + [
            "--address", self.address,
            "--num-cpus", str(num_cpus if num_cpus is not None else self._worker_cpus),
        ]  # fmt: skip
        # unshare -m gives the node its own mount namespace; mounts there stay private, so an
        # empty tmpfs over private_dir hides the driver's files from this node only.
        argv = [
            "unshare", "-m", "--propagation", "private",
            "sh", "-c", 'mount -t tmpfs -o size=256m tmpfs "$0" && exec "$@"',
            str(self.private_dir), *ray_argv,
        ]  # fmt: skip
        node = self._spawn(name, argv, temp_dir)
        self._workers.append(node)
        if wait:
            self.wait_for_nodes(n_alive + 1, timeout_s)
        return node.pgid

    def kill_worker(self, wait_dead: bool = True, timeout_s: float = 30) -> None:
        """SIGKILL the newest running worker node's process group and every other process of
        it (a lost machine). With ``wait_dead``, returns once the GCS has marked it dead."""
        alive = [w for w in self._workers if w.proc.poll() is None]
        if not alive:
            raise RuntimeError("no worker node is running")
        node = alive[-1]
        node.killed = True
        kill_process_group(node.pgid, node.proc, node.mnt_ns, grace_s=0)
        if wait_dead:
            self.wait_for_nodes(len(alive), timeout_s)  # the head + the other workers

    def stop(self, grace_s: float = 1.0) -> None:
        """Kill every node: SIGTERM to all process groups at once, then after ``grace_s``
        SIGKILL to them and to every process left in the nodes' mount namespaces."""
        nodes = self._all_nodes()
        for node in nodes:
            node.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(n.pids() for n in nodes):
            for n in nodes:
                n.proc.poll()
            time.sleep(0.1)
        errors = []
        for node in nodes:
            try:
                kill_process_group(node.pgid, node.proc, node.mnt_ns, grace_s=0)
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise RuntimeError("; ".join(errors))

    def processes(self) -> dict[str, list[int]]:
        """Live pids of every node this cluster started, by node name (``head``, ``w1``, ...)."""
        return {n.name: n.pids() for n in self._all_nodes()}

    @property
    def mount_namespaces(self) -> list[str]:
        """The nodes' mount namespaces (every process of a node is in its node's)."""
        return [n.mnt_ns for n in self._all_nodes() if n.mnt_ns]


def _reset_ray_auth_cache() -> None:
    """Make this process's Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN (private Ray API)."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # pragma: no cover - other Ray versions
        return
    reset_auth_token_state()


def _save_logs(cluster: TwoNodeCluster, dest: Path) -> None:
    """Copy each node's ``ray start`` output and Ray session logs to ``dest/<node>``."""
    for node in cluster._all_nodes():
        with contextlib.suppress(OSError):
            (dest / node.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(node.log, dest / node.name / "ray_start.log")
            shutil.copytree(
                node.temp_dir / "session_latest" / "logs",
                dest / node.name / "logs",
                ignore_dangling_symlinks=True,
                dirs_exist_ok=True,
            )


def _check_private_dir(private_dir: Path, keep_visible: list[Path]) -> None:
    for p in keep_visible:
        p = p.resolve()
        if p == private_dir or private_dir in p.parents:
            raise ValueError(f"private_dir {private_dir} would hide {p} from the worker node")


@contextlib.contextmanager
def two_node_cluster(
    tmp_path: str | os.PathLike | None,
    private_dir: str | os.PathLike,
    shared_dir: str | os.PathLike | None = None,
    worker_cpus: int = 1,
    head_cpus: int = 1,
    env: Mapping[str, str] | None = None,
    start_worker: bool = True,
    object_store_mb: int = 256,
    timeout_s: float = 60,
    keep_temp: bool = False,
) -> Iterator[TwoNodeCluster]:
    """A Ray head node and (with ``start_worker``) a worker node on 127.0.0.1.

    ``private_dir`` (created if missing) is hidden from the worker node by an empty tmpfs in its
    own mount namespace: the driver's files there are not visible to the worker node, and what
    the worker node writes there is not visible to anyone else (and is gone with the node).
    ``shared_dir`` is only checked not to lie under ``private_dir`` (every other path is shared
    anyway). ``env`` is extra environment for both nodes and every driver (e.g.
    ``s3.env``). Node temp dirs must be short (Unix socket paths are limited to 107 bytes, and
    Ray adds ~65 characters to them), so they are ``/tmp/rt-<random>-{h,w1,...}`` rather than
    under ``tmp_path``; they are removed on exit unless ``keep_temp``. When the block raises,
    the nodes' logs are first copied to ``tmp_path / "ray-cluster-logs"`` (if ``tmp_path``).
    Exiting kills every process of the nodes (never ``ray stop``).
    """
    if shutil.which("unshare") is None:
        raise RuntimeError("two_node_cluster needs unshare (util-linux)")
    private = Path(private_dir).resolve()
    private.mkdir(parents=True, exist_ok=True)
    cluster_id = secrets.token_hex(4)
    root = Path(f"/tmp/rt-{cluster_id}")
    root.mkdir(mode=0o700)
    visible = [REPO_ROOT, Path(sys.prefix), Path(sys.executable), root, Path("/tmp")]
    if shared_dir is not None:
        visible.append(Path(shared_dir))
    try:
        _check_private_dir(private, visible)
    except ValueError:
        shutil.rmtree(root, ignore_errors=True)
        raise

    port = free_port()
    token = secrets.token_hex(32)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    extra = dict(env or {})
    node_env = {**_base_environ(), **NODE_ENV_DEFAULTS, **extra, **auth}
    cluster = TwoNodeCluster(
        address=f"127.0.0.1:{port}",
        env={**extra, **auth, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        private_dir=private,
        shared_dir=Path(shared_dir) if shared_dir is not None else None,
        cluster_id=cluster_id,
        token=token,
        _node_env=node_env,
        _root=root,
        _worker_cpus=worker_cpus,
        _object_store_bytes=object_store_mb * 1024 * 1024,
    )
    try:
        # Both nodes start at once: the worker's ray start retries the GCS for ~20 s.
        cluster._spawn_head(head_cpus, port)
        if start_worker:
            cluster.start_worker(wait=False)
        cluster._wait_head(timeout_s)
        cluster.wait_for_nodes(2 if start_worker else 1, timeout_s)
        yield cluster
    except BaseException:
        if tmp_path is not None:
            _save_logs(cluster, Path(tmp_path) / "ray-cluster-logs")
        raise
    finally:
        try:
            cluster.stop()
        finally:
            if not keep_temp:
                for node in cluster._all_nodes():
                    shutil.rmtree(node.temp_dir, ignore_errors=True)
                shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# S3


@dataclass
class S3Server:
    """A running moto S3 server (see :func:`s3_server`).

    ``env`` is what a process needs so ``pyarrow.fs.FileSystem.from_uri("s3://<bucket>/...")``
    (and boto3) reach this server: endpoint, dummy credentials, region.
    """

    endpoint_url: str
    bucket: str
    env: dict[str, str]
    pgid: int

    def uri(self, key: str = "") -> str:
        """``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` for this server (no environment variables needed)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.endpoint_url.removeprefix("http://"),
            scheme="http",
            access_key=self.env["AWS_ACCESS_KEY_ID"],
            secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region=self.env["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Set :attr:`env` in ``os.environ`` for the block, then restore it."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def s3_server(bucket: str = "ser-test", timeout_s: float = 30) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a subprocess in its own process group, so Ray nodes in
    other processes reach it), with ``bucket`` created; killed on exit (data is in memory)."""
    port = free_port()
    # A file, not a pipe: moto logs every request, and a full pipe would block it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=_base_environ(),
    )
    endpoint = f"http://127.0.0.1:{port}"
    server = S3Server(
        endpoint_url=endpoint,
        bucket=bucket,
        env={
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        pgid=proc.pid,
    )
    try:
        try:
            _wait_port("127.0.0.1", port, timeout_s, proc)
        except (RuntimeError, TimeoutError) as e:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"moto server did not start: {e}\n{err[-3000:]}") from e
        server.filesystem().create_dir(bucket)
        yield server
    finally:
        kill_process_group(proc.pid, proc, grace_s=2)
        log.close()
