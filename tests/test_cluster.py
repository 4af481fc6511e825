"""The cluster edge: nodes, the reachability check of run locations, waiting for resources.

A second node is not needed here: the per-node probe is plain storage code (tested on local
folders and on S3), the error is a pure function of per-node results (tested with fake
results), and the probe tasks are run on the one real node of ``ray_local`` (also under
several names, and against a node id that does not exist).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ser_ray.common import storage
from ser_ray.distributed import cluster
from ser_ray.distributed.cluster import Check, ClusterTooSmallError, RunLocationError

FIX = "on a folder every node mounts (NFS, EFS, a Kubernetes volume) or on object storage"


@pytest.fixture
def no_override():
    """Whatever a test tells :func:`cluster.note_joined` is forgotten after it."""
    yield
    cluster.note_joined(None)


def _writable(location) -> Check:
    check = Check("--out", storage.absolute(location), True, "token-1")
    storage.write_text(cluster.marker_path(check), check.expected)
    return check


# --- nodes ------------------------------------------------------------------------------


def test_alive_nodes_of_a_local_instance(ray_local):
    [node] = cluster.alive_nodes()
    assert node["Alive"] and node["node_id"] == ray_local.get_runtime_context().get_node_id()
    assert node["ip"] and node["label"]
    assert node["hostname"] in node["label"] or node["ip"] in node["label"]


def test_a_local_instance_is_not_joined_and_spans_one_node(ray_local, no_override):
    assert not cluster.joined_existing_cluster()
    assert not cluster.spans_nodes()
    cluster.note_joined(True)  # e.g. a cluster whose autoscaler may add nodes later
    assert cluster.spans_nodes()


def test_labels_tell_apart_nodes_on_one_machine():
    nodes = [
        {"node_id": "aaaaaaaa11", "ip": "10.0.0.1", "hostname": "vm"},
        {"node_id": "bbbbbbbb22", "ip": "10.0.0.1", "hostname": "vm"},
        {"node_id": "cccccccc33", "ip": "10.0.0.2", "hostname": ""},
    ]
    labels = [n["label"] for n in cluster._labelled(nodes)]
    assert labels == ["vm (10.0.0.1) node aaaaaaaa", "vm (10.0.0.1) node bbbbbbbb", "10.0.0.2"]


# --- what one node sees (no Ray) -------------------------------------------------------------


def test_a_node_that_sees_the_marker_answers_and_writes_its_reply(tmp_path):
    check = _writable(tmp_path / "out")
    assert cluster.probe_location(check, "node-a") == ""
    assert storage.read_text(cluster.reply_path(check, "node-a")) == "token-1"


def test_a_node_without_the_marker_cannot_see_the_location(tmp_path):
    check = Check("--out", str(tmp_path / "out"), True, "token-1")
    assert "marker file is not there" in cluster.probe_location(check, "node-a")
    assert not (tmp_path / "out").exists()  # nothing written on a disk the driver lacks


def test_a_marker_with_another_token_is_another_folder(tmp_path):
    _writable(tmp_path / "out")
    other = Check("--out", str(tmp_path / "out"), True, "token-2")
    storage.write_text(cluster.marker_path(other), "token-1")
    assert "another token" in cluster.probe_location(other, "node-a")


def test_a_read_only_location_must_hold_the_same_entries(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "Actor_01").mkdir(parents=True)
    (corpus / "a.wav").write_bytes(b"x")
    seen = cluster.fingerprint(str(corpus))
    assert cluster.probe_location(Check("--data-dir", str(corpus), False, seen), "n") == ""
    (corpus / "b.wav").write_bytes(b"y")
    problem = cluster.probe_location(Check("--data-dir", str(corpus), False, seen), "n")
    assert "something else" in problem and "3 entries" in problem
    missing = Check("--data-dir", str(tmp_path / "nowhere"), False, seen)
    assert cluster.probe_location(missing, "n") == "nothing is there"


def test_the_fingerprint_leaves_out_reachability_markers(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    before = cluster.fingerprint(str(tmp_path))
    _writable(tmp_path)
    assert cluster.fingerprint(str(tmp_path)) == before
    assert cluster.fingerprint(str(tmp_path / "a.parquet")) == "file of 1 bytes"


def test_a_probe_that_raises_reports_the_first_line_of_the_error():
    check = Check("--out", "nosuchscheme://bucket/run", True, "token-1")
    problem = cluster.probe_location(check, "node-a")
    assert problem and "\n" not in problem and ":" in problem


def test_the_probe_works_on_object_storage(s3_location):
    check = _writable(storage.join(s3_location, "run"))
    assert cluster.probe_location(check, "node-a") == ""
    assert storage.read_text(cluster.reply_path(check, "node-a")) == "token-1"


# --- the error line (pure) -------------------------------------------------------------------


def test_no_error_when_every_node_sees_every_location():
    checks = [Check("--out", "/runs/x", True, "t"), Check("--data-dir", "/data", False, "f")]
    assert cluster.reach_error(checks, {"vm-1": ["", ""], "vm-2": ["", ""]}) is None


def test_the_error_names_the_location_the_nodes_and_the_fix():
    checks = [Check("--out", "/runs/x", True, "t"), Check("--data-dir", "/data", False, "f")]
    results = {
        "vm-1 (10.0.0.1)": ["", ""],  # the driver's node: sees both
        "vm-2 (10.0.0.2)": ["the driver's marker file is not there", ""],
        "vm-3 (10.0.0.3)": ["the driver's marker file is not there", ""],
        "vm-4 (10.0.0.4)": ["it did not answer within 60 s"] * 2,
        "vm-5 (10.0.0.5)": ["", "OSError: When reading information for key 'data' ..."],
    }
    error = cluster.reach_error(checks, results)
    assert isinstance(error, RunLocationError) and isinstance(error, ValueError)
    line = str(error)
    assert "\n" not in line
    assert "--out /runs/x is not seen by every node" in line
    assert "on vm-2 (10.0.0.2), vm-3 (10.0.0.3): the driver's marker file is not there" in line
    assert "on vm-4 (10.0.0.4): it did not answer within 60 s" in line
    assert "--data-dir /data is not seen by every node" in line
    assert "vm-5 (10.0.0.5): OSError: When reading" in line
    assert "vm-1" not in line
    assert f"Put --out and --data-dir {FIX}" in line


def test_the_error_names_a_few_nodes_then_counts_the_rest():
    checks = [Check("--out", "s3://b/run", True, "t")]
    results = {
        f"vm-{i:02d}": ["NoCredentialsError: Unable to locate credentials"] for i in range(9)
    }
    line = str(cluster.reach_error(checks, results))
    assert "vm-04 and 4 more: NoCredentialsError: Unable to locate credentials" in line
    assert "vm-05" not in line


def test_first_line_of_a_ray_task_error_is_its_cause():
    class Wrapped(Exception):
        cause = PermissionError("Access Denied\nmore detail")

    assert cluster.first_line(Wrapped("Traceback ...")) == "PermissionError: Access Denied"
    assert cluster.first_line(ValueError("")) == "ValueError"
    assert len(cluster.first_line(OSError("x" * 1000))) == cluster.MAX_PROBLEM_CHARS


# --- probing real nodes (the one node of ray_local) ---------------------------------------


def test_a_single_node_cluster_is_not_probed(ray_local, tmp_path):
    out = tmp_path / "out"
    cluster.check_reachable({"--out": str(out)}, {"--data-dir": str(tmp_path)})
    assert not out.exists()


def test_probe_tasks_run_on_the_node_and_answer(ray_local, tmp_path):
    [node] = cluster.alive_nodes()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    checks = [
        _writable(tmp_path / "out"),
        Check("--data-dir", str(corpus), False, cluster.fingerprint(str(corpus))),
        Check("--test-data-dir", str(corpus), False, "folder of 7 entries (abc)"),
    ]
    results = cluster.probe_nodes(checks, [node], timeout_s=60)
    assert list(results) == [node["label"]]
    assert results[node["label"]][:2] == ["", ""]
    assert "something else" in results[node["label"]][2]


def test_a_node_that_is_gone_or_silent_counts_as_not_seeing(ray_local, tmp_path):
    ghost = {"node_id": "ab" * 28, "label": "ghost (10.9.9.9)"}
    checks = [_writable(tmp_path / "out")]
    start = time.monotonic()
    [problem] = cluster.probe_nodes(checks, [ghost], timeout_s=30)["ghost (10.9.9.9)"]
    assert problem and time.monotonic() - start < 30  # refused at once, not waited out
    invalid = {"node_id": "ff" * 28, "label": "nil"}  # an id Ray refuses at submission
    [problem] = cluster.probe_nodes(checks, [invalid], timeout_s=30)["nil"]
    assert problem.startswith("ValueError: Invalid node_id")
    [node] = cluster.alive_nodes()
    [problem] = cluster.probe_nodes(checks, [node], timeout_s=0)[node["label"]]
    assert problem == "it did not answer within 0 s"


def test_check_reachable_on_several_nodes(ray_local, tmp_path, monkeypatch):
    """The full driver path, with the one real node standing in for two: every node sees a
    local folder; the markers and replies are gone afterwards."""
    [node] = cluster.alive_nodes()
    twins = [{**node, "label": "vm-a"}, {**node, "label": "vm-b"}]
    monkeypatch.setattr(cluster, "alive_nodes", lambda: twins)
    out, corpus = tmp_path / "out", tmp_path / "corpus"
    corpus.mkdir()
    cluster.check_reachable({"--out": str(out)}, {"--data-dir": str(corpus)})
    assert storage.list_names(out) == []


def test_check_reachable_refuses_a_location_a_node_cannot_see(ray_local, tmp_path, monkeypatch):
    [node] = cluster.alive_nodes()
    ghost = {"node_id": "ee" * 28, "label": "ghost (10.9.9.9)"}
    monkeypatch.setattr(cluster, "alive_nodes", lambda: [node, ghost])
    out = tmp_path / "out"
    with pytest.raises(RunLocationError) as caught:
        cluster.check_reachable({"--out": str(out)}, timeout_s=30)
    line = str(caught.value)
    assert f"--out {out} is not seen by every node (on ghost (10.9.9.9): " in line
    assert node["label"] not in line and FIX in line
    assert storage.list_names(out) == []  # cleaned up on failure too


# --- waiting for resources -------------------------------------------------------------------


def test_resources_already_there_return_at_once(ray_local):
    lines: list[str] = []
    start = time.monotonic()
    have = cluster.wait_for_resources(1, 0, timeout_s=60, reason="1 fold", print_fn=lines.append)
    assert have["CPU"] >= 1 and lines == [] and time.monotonic() - start < 1


def test_resources_that_never_come_fail_in_one_line(ray_local):
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(ClusterTooSmallError) as caught:
        cluster.wait_for_resources(
            64, 0, timeout_s=1, poll_s=0.2, reason="8 folds at once", print_fn=lines.append
        )
    assert 1 <= time.monotonic() - start < 10
    assert lines == ["waiting up to 1 s for the cluster to add 62 CPUs/0 GPUs (8 folds at once)…"]
    message = str(caught.value)
    assert "\n" not in message
    assert "asks for 64 CPUs/0 GPUs (8 folds at once) but the cluster has 2 CPUs/0 GPUs" in message
    assert "--concurrent-folds" in message and "raise --cluster-wait-s" in message
    # without an autoscaler the request is only stored; withdrawn when the nodes do not come
    assert _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) == b"[]"


def test_no_wait_allowed_fails_at_once(ray_local):
    with pytest.raises(ClusterTooSmallError, match="after waiting 0 s"):
        cluster.wait_for_resources(0, 1, timeout_s=0, reason="1 GPU per fold", print_fn=print)


def test_resources_that_arrive_end_the_wait(ray_local, monkeypatch):
    sizes = iter([{"CPU": 2.0}, {"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}])
    monkeypatch.setattr(ray_local, "cluster_resources", lambda: next(sizes))
    asked: list[list[dict]] = []
    monkeypatch.setattr(cluster, "_request", asked.append)
    lines: list[str] = []
    have = cluster.wait_for_resources(
        8, 1, timeout_s=30, poll_s=0.01, reason="4 folds", print_fn=lines.append
    )
    assert have == {"CPU": 8.0, "GPU": 1.0}
    assert lines[-1] == "cluster now has 8 CPUs/1 GPU"
    assert asked == [[{"CPU": 1.0}] * 8 + [{"GPU": 1.0}]]  # kept while the run goes on
    cluster.release_requested_resources()
    assert asked[-1] == []


def test_a_model_is_published_for_every_node_only_when_the_cluster_spans_nodes(
    tmp_path, monkeypatch
):
    from ser_ray.distributed import published

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    run = str(tmp_path / "run")
    monkeypatch.setattr(cluster, "spans_nodes", lambda: False)
    assert published.published_model(str(model), run) == str(model)
    assert published.published_model("demo-random", run) == "demo-random"
    monkeypatch.setattr(cluster, "spans_nodes", lambda: True)
    copy = published.published_model(str(model), run)
    assert copy == f"{run}/models/model-{published.content_key(model)}"
    assert (Path(copy) / "model.safetensors").read_bytes() == b"weights"
    assert published.published_model(str(model), run) == copy  # once
    (model / "model.safetensors").write_bytes(b"retrained")  # another content: another copy
    assert published.published_model(str(model), run) != copy
    assert published.published_corpus(model, run).startswith(f"{run}/corpora/model-")


def test_a_hub_model_is_downloaded_once_by_the_driver_and_published(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    from ser_ray.distributed import published

    snapshot = tmp_path / "hub" / "snapshot"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "wavlm"}')
    fetched = []
    monkeypatch.setattr(cluster, "spans_nodes", lambda: True)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo: fetched.append(repo) or str(snapshot)
    )
    run = str(tmp_path / "run")
    copy = published.published_model("microsoft/wavlm-base-plus", run)
    assert fetched == ["microsoft/wavlm-base-plus"]
    assert copy.startswith(f"{run}/models/snapshot-")
    assert (Path(copy) / "config.json").read_text() == '{"model_type": "wavlm"}'

    def offline(repo):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert published.published_model("org/other", run) == "org/other"  # each node fetches it
    assert "org/other: not downloaded by the driver (no connection)" in caplog.text
