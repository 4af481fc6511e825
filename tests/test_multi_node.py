"""The study on a real cluster of two nodes (tests/cluster_fixtures.py): the worker node has its
own view of the disk, where the driver's private folder is an empty tmpfs, as on a second
machine. Every job here is a driver subprocess joined with ``--address``.

The one-node reference of each check is the same job on a local Ray instance of 2 CPUs (the
cluster's two nodes have 1 CPU each), so the resource plan, and with it every seeded result, is
the same. The driver's model cache (``SER_RAY_CACHE``: the demo encoder it builds) is in its
private folder, so a fold that loaded the encoder from the driver's disk would fail on the
worker node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_fixtures import REPO_ROOT

pytestmark = pytest.mark.cluster

#: The smoke study of the issue's check (SVM and fine-tuned wav2vec2, one epoch).
SMOKE = ["--smoke-test", "--model", "demo", "--variants", "svm,wav2vec2"]
#: Folds long enough to be interrupted: three epochs of the random-weight demo-size model.
LONG_FOLDS = ["--model", "demo-random", "--variants", "wav2vec2", "--epochs", "3"]

#: Where each kind of Ray work ran, from the GCS's task events and actor table (no dashboard).
PLACEMENT = r"""
import json
import ray
from ray._private import state

ray.init(log_to_driver=False)
names, nodes_of = {}, {}
for event in state.state._get_all_task_events():
    task = event.task_id.hex()
    if event.task_info.name:
        names[task] = event.task_info.name
    if event.HasField("state_updates") and event.state_updates.node_id:
        nodes_of.setdefault(task, set()).add(event.state_updates.node_id.hex())
placed = {}
for task, name in names.items():
    kinds = [k for k, part in (("featurize", "featurize_batch"), ("cache", "ClipFeatureUDF"))
             if part in name]
    for kind in kinds:
        placed.setdefault(kind, set()).update(nodes_of.get(task, ()))
for actor in state.actors().values():
    if actor["ActorClassName"] == "ImplicitFunc":  # a Tune trial: a fold
        placed.setdefault("folds", set()).add(actor["Address"]["NodeID"])
print(json.dumps({k: sorted(v) for k, v in placed.items()}))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A demo corpus of 96 clips (more than featurizing in the driver takes: Ray tasks do it)."""
    from ser_ray.corpus.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("shared_corpus")
    return write_demo_corpus(root / "corpus", n_actors=24, clips_per_actor=4, speech_scale=0.5)


def _local_run(args: list[str], out: Path, cache: Path) -> dict:
    """The job on a local Ray instance of 2 CPUs (the reference); its summary.json."""
    proc = subprocess.run(
        [sys.executable, "jobs/kfold.py", *args, "--num-cpus", "2", "--out", str(out)],
        cwd=REPO_ROOT,
        env={**_environ(), "SER_RAY_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _metrics(summary: dict) -> dict:
    """What must not depend on where the work ran: per-fold and mean metrics of every variant."""
    variants = [k for k in summary["mean"]]
    folds = [
        {"fold": f["fold"], "n_test": f["n_test"], **{v: f[v] for v in variants if v in f}}
        for f in summary["folds"]
    ]
    return {"folds": folds, "mean": summary["mean"], "std": summary["std"]}


def _on_cluster(cluster, args: list[str], out: str, **kwargs) -> subprocess.CompletedProcess:
    cache = {"SER_RAY_CACHE": str(cluster.private_dir / "cache")}
    return cluster.run_driver(
        ["jobs/kfold.py", *args, "--address", cluster.address, "--out", out],
        env={**cache, **kwargs.pop("env", {})},
        timeout_s=600,
        **kwargs,
    )


def _both_nodes_worked(cluster, kinds: tuple[str, ...]) -> None:
    """Featurizing tasks and fold trials (a CPU each, one CPU per node) ran on both nodes;
    the cache's actors (no CPU: spread over the nodes as Ray can, not pinned) on some."""
    placed = cluster.run_driver_json(PLACEMENT)
    both = {cluster.head_node_id(), cluster.worker_node_id()}
    for kind in kinds:
        nodes = set(placed.get(kind, []))
        assert nodes == both if kind != "cache" else nodes and nodes <= both, (kind, placed)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """The smoke study on one node."""
    root = tmp_path_factory.mktemp("one_node")
    return _metrics(_local_run([*SMOKE, "--data-dir", str(corpus)], root / "run", root / "cache"))


def test_shared_folder_run_uses_both_nodes_and_equals_one_node(make_cluster, corpus, reference):
    cluster = make_cluster(shared_dir=corpus.parent)
    out = corpus.parent / "run"
    _on_cluster(cluster, [*SMOKE, "--data-dir", str(corpus)], str(out))
    assert _metrics(json.loads((out / "summary.json").read_text())) == reference
    # the demo encoder the driver built in its private cache reached the workers as a copy
    (published,) = (out / "models").iterdir()
    assert published.name.startswith("model-") and (published / "model.safetensors").exists()
    _both_nodes_worked(cluster, ("featurize", "cache", "folds"))


def test_s3_run_uses_both_nodes_and_equals_one_node(make_cluster, moto_s3, corpus, reference):
    from ser_ray.common import storage

    with moto_s3.environ():
        storage.upload(corpus, moto_s3.uri("corpus"))
    cluster = make_cluster(env=moto_s3.env)
    out = moto_s3.uri("run")
    _on_cluster(cluster, [*SMOKE, "--data-dir", moto_s3.uri("corpus")], out)
    with moto_s3.environ():
        summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
        names = storage.list_names(out)
    assert _metrics(summary) == reference
    for name in ("config.json", "protocol.json", "predictions.csv", "rejected.csv", "ray"):
        assert name in names
    assert {"prepared", "feature_cache", "tensorboard", "wav2vec2", "svm_models"} <= set(names)
    assert not (REPO_ROOT / "s3:").exists()
    _both_nodes_worked(cluster, ("featurize", "cache", "folds"))


def test_a_run_location_the_worker_cannot_see_is_refused_before_any_work(make_cluster, corpus):
    cluster = make_cluster(shared_dir=corpus.parent)
    out = cluster.private_dir / "run"
    proc = _on_cluster(cluster, [*SMOKE, "--data-dir", str(corpus)], str(out), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"--out {out} is not seen by every node" in line
    assert "NFS" in line and "s3://" in line
    assert sorted(p.name for p in out.rglob("*")) == []  # no features, no protocol, no marker


@pytest.mark.xfail(
    strict=False,
    reason="flaky (2 of the last 6 runs): the joined node sometimes takes no fold before the "
    "head's fold ends, so there is no moment to kill it mid-fold; under investigation",
)
def test_a_node_lost_mid_fold_is_replaced_and_a_node_that_joins_later_is_used(
    make_cluster, corpus, tmp_path
):
    """The cluster starts with its head only; ``--concurrent-folds 2`` asks for a second CPU
    and the job waits for it; the worker node that joins takes a fold; that node is then
    killed while its fold trains, and the fold restarts on the head from its last
    checkpoint. Every fold's metrics equal an undisturbed one-node run's."""
    args = [*LONG_FOLDS, "--data-dir", str(corpus), "--concurrent-folds", "2"]
    reference = _metrics(_local_run(args, tmp_path / "one_node", tmp_path / "cache"))
    cluster = make_cluster(shared_dir=corpus.parent, start_worker=False)
    out = corpus.parent / "late_run"
    cache = {"SER_RAY_CACHE": str(cluster.private_dir / "cache")}
    argv = [sys.executable, "jobs/kfold.py", *args, "--address", cluster.address]
    driver = subprocess.Popen(
        [*argv, "--out", str(out), "--cluster-wait-s", "120"],
        cwd=REPO_ROOT,
        env=cluster.driver_environ(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        _start_worker_when_asked(driver, lines, cluster)
        running = _kill_worker_when_both_folds_checkpointed(driver, lines, cluster)
        before_kill = len(lines)
        rest, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    output = "".join(lines) + rest
    (tmp_path / "driver.log").write_text(output)
    assert driver.returncode == 0, output[-4000:]
    assert "2 of 6 folds at once" in output
    assert _metrics(json.loads((out / "summary.json").read_text())) == reference
    # the folds unfinished at the kill finished afterwards, on the head; the lost node's fold
    # went on from its last checkpoint (or its start): no fold trained its first epoch twice
    after_kill = "".join(lines[before_kill:]) + rest
    for fold in running:
        assert f"wav2vec2 fold {fold}: done" in after_kill, output[-4000:]
    for fold in range(1, 7):
        assert output.count(f"wav2vec2 fold {fold} epoch 1/3:") == 1, output[-4000:]


def _start_worker_when_asked(driver, lines: list[str], cluster) -> None:
    """Read the job's console until it has waited for, and got, the worker node's CPU."""
    for line in driver.stdout:
        lines.append(line)
        if line.startswith("waiting up to 120 s for the cluster to add 1 CPU/0 GPUs"):
            cluster.start_worker()
        if line.startswith("cluster now has 2 CPUs"):
            return
    raise AssertionError("".join(lines)[-4000:])


def _kill_worker_when_both_folds_checkpointed(driver, lines: list[str], cluster) -> set[int]:
    """Kill the worker node once a fold has reported an epoch (with its checkpoint) while a
    fold trial (``ray::ImplicitFunc``) runs on the worker node; the folds then unfinished."""
    reported: set[int] = set()
    done: set[int] = set()
    for line in driver.stdout:
        lines.append(line)
        match = re.match(r"wav2vec2 fold (\d+) (epoch \d+/3|done)", line)
        if match:
            fold = int(match.group(1))
            (done if match.group(2) == "done" else reported).add(fold)
        if reported - done and _fold_trial_on(cluster, "w1"):
            cluster.kill_worker()
            return reported - done
    raise AssertionError("".join(lines)[-4000:])


def _fold_trial_on(cluster, node: str) -> bool:
    """Whether a Tune trial process (a fold) runs on ``node`` of the cluster."""
    for pid in cluster.processes().get(node, []):
        try:
            if b"ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:  # ended meanwhile
            continue
    return False
