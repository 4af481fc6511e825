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
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cluster_fixtures import REPO_ROOT

pytestmark = pytest.mark.cluster

#: The smoke study of the issue's check (SVM and fine-tuned wav2vec2, one epoch).
SMOKE = ["--smoke-test", "--model", "demo", "--variants", "svm,wav2vec2"]
#: Folds long enough to be interrupted between their first and last epoch: the random-weight
#: demo-size model.
EPOCHS = 5
LONG_FOLDS = ["--model", "demo-random", "--variants", "wav2vec2", "--epochs", str(EPOCHS)]

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
    if "featurize_batch" in name:
        placed.setdefault("featurize", set()).update(nodes_of.get(task, ()))
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
    """Featurizing tasks and fold trials (a CPU each, one CPU per node) ran on both nodes.
    (The frozen-CNN cache of this small corpus is computed in the driver, without actors.)"""
    placed = cluster.run_driver_json(PLACEMENT)
    both = {cluster.head_node_id(), cluster.worker_node_id()}
    for kind in kinds:
        nodes = set(placed.get(kind, []))
        assert nodes == both, (kind, placed)


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
    _both_nodes_worked(cluster, ("featurize", "folds"))


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
    _both_nodes_worked(cluster, ("featurize", "folds"))


def test_a_run_location_the_worker_cannot_see_is_refused_before_any_work(make_cluster, corpus):
    cluster = make_cluster(shared_dir=corpus.parent)
    out = cluster.private_dir / "run"
    proc = _on_cluster(cluster, [*SMOKE, "--data-dir", str(corpus)], str(out), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"--out {out} is not seen by every node" in line
    assert "NFS" in line and "s3://" in line
    assert sorted(p.name for p in out.rglob("*")) == []  # no features, no protocol, no marker


def test_a_node_lost_mid_fold_is_replaced_and_a_node_that_joins_later_is_used(
    make_cluster, corpus, tmp_path
):
    """The cluster starts with its head only; ``--concurrent-folds 2`` asks for a second CPU
    and the job waits for it; the worker node that joins takes a fold; that node is then
    killed while its fold trains, after the fold's first epoch (and checkpoint), and the fold
    goes on on the head from its last checkpoint. Every fold's metrics equal an undisturbed
    one-node run's.

    Until the kill, another driver holds the head's CPU: the joined node is then the only
    place a fold can run. (Without it, the head's trial process, started first, may take
    every fold: Tune gives a waiting fold to a finished trial's process rather than wait for
    the new node's, still importing torch.)"""
    args = [*LONG_FOLDS, "--data-dir", str(corpus), "--concurrent-folds", "2"]
    reference = _metrics(_local_run(args, tmp_path / "one_node", tmp_path / "cache"))
    cluster = make_cluster(shared_dir=corpus.parent, start_worker=False)
    head_cpu = _hold_a_cpu(cluster)
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
    reader = threading.Thread(target=_read_lines, args=(driver.stdout, lines), daemon=True)
    reader.start()
    try:
        _start_worker_when_asked(driver, lines, cluster)
        killed_fold, before_kill = _kill_worker_mid_fold(driver, lines, cluster)
        _release(head_cpu)
        driver.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        driver.kill()
        _release(head_cpu)
    output = "".join(lines)
    (tmp_path / "driver.log").write_text(output)
    assert driver.returncode == 0, output[-4000:]
    assert "2 of 6 folds at once" in output
    assert _metrics(json.loads((out / "summary.json").read_text())) == reference
    # the lost node's fold finished after the kill, from its checkpoint: no fold trained its
    # first epoch twice
    after_kill = "".join(lines[before_kill:])
    assert f"wav2vec2 fold {killed_fold}: done" in after_kill, output[-4000:]
    # one line for the failed attempt (not Tune's traceback)
    assert f"wav2vec2 fold {killed_fold}: its trial failed (failure 1" in after_kill, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    for fold in range(1, 7):
        assert output.count(f"wav2vec2 fold {fold} epoch 1/{EPOCHS}:") == 1, output[-4000:]


#: A driver whose actor holds one CPU until the driver is killed.
HOLD_A_CPU = """
import time
import ray

ray.init(log_to_driver=False)
holder = ray.remote(num_cpus=1)(type("Holder", (), {"ready": lambda self: True})).remote()
ray.get(holder.ready.remote())
print("holding", flush=True)
time.sleep(3600)
"""


def _hold_a_cpu(cluster) -> subprocess.Popen:
    """A driver (its own process group) holding a CPU of the cluster, once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_CPU],
        env=cluster.driver_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # Ray's few lines; read only when it failed
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()  # "holding", or nothing once it failed
    if line != "holding\n":
        proc.kill()
        raise AssertionError(line + proc.stderr.read()[-4000:])
    return proc


def _release(holder: subprocess.Popen) -> None:
    """Kill ``holder``'s process group: Ray then ends its actor and frees the CPU."""
    if holder.poll() is None:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def _read_lines(stream, lines: list[str]) -> None:
    """Append each line of ``stream`` to ``lines`` as it comes (a thread: the test polls)."""
    for line in stream:
        lines.append(line)


def _start_worker_when_asked(driver, lines: list[str], cluster) -> None:
    """Wait until the job has waited for, and got, the worker node's CPU."""
    asked = False
    for _ in _polling(driver, lines, timeout_s=300):
        text = "".join(lines)
        if not asked and "waiting up to 120 s for the cluster to add 1 CPU/0 GPUs" in text:
            cluster.start_worker()
            asked = True
        if "cluster now has 2 CPUs" in text:
            return


def _kill_worker_mid_fold(driver, lines: list[str], cluster) -> tuple[int, int]:
    """Kill the worker node while a fold trial (``ray::ImplicitFunc``) runs there, once that
    fold has reported its first epoch (its checkpoint is in the run location) and before it
    ends; the fold's number (from the trial's working folder, ``…fold=<k>_…``) and how many
    lines the job had printed before the kill."""
    for _ in _polling(driver, lines, timeout_s=600):
        fold = _fold_trial_on(cluster, "w1")
        text = "".join(lines)
        if fold and f"fold {fold} epoch 1/" in text and f"fold {fold}: done" not in text:
            before_kill = len(lines)
            cluster.kill_worker()
            return fold, before_kill


def _polling(driver, lines: list[str], timeout_s: float, every_s: float = 0.1):
    """Yield every ``every_s`` seconds while the driver runs; fail (with its output) when it
    ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while driver.poll() is None and time.monotonic() < deadline:
        yield
        time.sleep(every_s)
    raise AssertionError("".join(lines)[-4000:])


def _fold_trial_on(cluster, node: str) -> int | None:
    """The fold of a Tune trial process (a fold) that trains on ``node`` of the cluster."""
    for pid in cluster.processes().get(node, []):
        try:
            if b"ImplicitFunc.train" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            match = re.search(r"fold=(\d+)", os.readlink(f"/proc/{pid}/cwd"))
        except OSError:  # ended meanwhile
            continue
        if match:
            return int(match.group(1))
    return None
