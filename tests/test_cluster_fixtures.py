"""The multi-node test helpers are honest: two real Ray nodes, a worker node that does not see
the driver's private files, S3 data every node reads, and nothing left running afterwards.

Ray drivers run in subprocesses, so this module coexists with the session's ``ray_local``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster_fixtures import pgid_alive, pids_in_mount_ns, two_node_cluster

#: Driver: one task pinned to each node reports what that node sees; argv: private file,
#: shared file, S3 URI, path the worker node writes into the private dir.
PROBE = r"""
import json, os, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

private, shared, uri, worker_out = sys.argv[1:5]
ray.init(log_to_driver=False)


@ray.remote(num_cpus=1)
def probe(write_to=None):
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        s3_text = f.read().decode()
    if write_to:
        with open(write_to, "w") as f:
            f.write("from the worker node")
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "private": os.path.exists(private),
        "shared": os.path.exists(shared),
        "s3": s3_text,
    }


alive = [n for n in ray.nodes() if n["Alive"]]
head = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
worker = next(n["NodeID"] for n in alive if n["NodeID"] != head)
pin = lambda node: NodeAffinitySchedulingStrategy(node, soft=False)  # noqa: E731
out = {
    "driver_node": ray.get_runtime_context().get_node_id(),
    "head_id": head,
    "worker_id": worker,
    "head": ray.get(probe.options(scheduling_strategy=pin(head)).remote()),
    "worker": ray.get(probe.options(scheduling_strategy=pin(worker)).remote(worker_out)),
    "cpus": ray.cluster_resources().get("CPU"),
}
print(json.dumps(out))
"""


def test_s3_server_env_alone_is_enough(moto_s3):
    """A bare process with only ``moto_s3.env`` reads and writes ``s3://`` via pyarrow."""
    with moto_s3.filesystem().open_output_stream(f"{moto_s3.bucket}/in.txt") as f:
        f.write(b"written by the test")
    script = (
        "import pyarrow.fs as pafs, sys\n"
        "fs, p = pafs.FileSystem.from_uri(sys.argv[1])\n"
        "print(fs.open_input_stream(p).read().decode())\n"
        "fs, p = pafs.FileSystem.from_uri(sys.argv[2])\n"
        "with fs.open_output_stream(p) as f: f.write(b'written by the child')\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **moto_s3.env}
    out = subprocess.run(
        [sys.executable, "-c", script, moto_s3.uri("in.txt"), moto_s3.uri("sub/out.txt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "written by the test"
    with moto_s3.filesystem().open_input_stream(f"{moto_s3.bucket}/sub/out.txt") as f:
        assert f.read() == b"written by the child"


def test_two_node_cluster(moto_s3, tmp_path):
    private, shared = tmp_path / "private", tmp_path / "shared"
    shared.mkdir()
    with two_node_cluster(tmp_path, private, shared, env=moto_s3.env) as cluster:
        (private / "secret.txt").write_text("driver only")
        (shared / "common.txt").write_text("everyone")
        with moto_s3.filesystem().open_output_stream(f"{moto_s3.bucket}/probe.txt") as f:
            f.write(b"hello from s3")

        args = [private / "secret.txt", shared / "common.txt", moto_s3.uri("probe.txt")]
        args = [*map(str, args), str(private / "from_worker.txt")]
        out = cluster.run_driver_json(PROBE, args=args, timeout_s=120)

        assert out["cpus"] == 2
        assert out["head"] == {
            "node_id": out["head_id"], "private": True, "shared": True, "s3": "hello from s3"
        }  # fmt: skip
        assert out["worker"] == {
            "node_id": out["worker_id"], "private": False, "shared": True, "s3": "hello from s3"
        }  # fmt: skip
        # The driver attaches to the head node (both raylets have the same IP), and what the
        # worker node writes into the private dir stays on the worker node.
        assert out["driver_node"] == out["head_id"]
        assert not (private / "from_worker.txt").exists()
        assert sorted(cluster.node_ids()) == sorted([out["head_id"], out["worker_id"]])
        assert cluster.worker_node_id() == out["worker_id"]

        # A lost machine: the worker node's whole process group dies, the GCS marks it dead.
        first_pgid = cluster.worker_pgid
        assert len(cluster.processes()["w1"]) > 3  # ray start, raylet, agents, workers
        cluster.kill_worker()
        assert not pgid_alive(first_pgid) and cluster.worker_pgid is None
        assert cluster.processes()["w1"] == []
        assert cluster.node_ids() == [out["head_id"]]

        # A replacement joins as a new node (as an autoscaler would add one).
        assert cluster.start_worker() != first_pgid
        alive = {n["node_id"] for n in cluster.wait_for_nodes(2)}
        assert out["head_id"] in alive and out["worker_id"] not in alive

        pgids, namespaces, temp_dirs = (
            cluster.all_pgids,
            cluster.mount_namespaces,
            cluster.temp_dirs,
        )
    # Leaving the block killed every process of the three nodes and removed their temp dirs.
    assert len(pgids) == len(namespaces) == 3
    assert not any(pgid_alive(p) for p in pgids)
    assert not any(pids_in_mount_ns(ns) for ns in namespaces)
    assert not _processes_mentioning(str(temp_dirs[0]))  # e.g. gcs_server, raylet
    assert not any(Path(d).exists() for d in temp_dirs)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found
