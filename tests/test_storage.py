"""Run locations: the same helpers for a local folder and an s3:// URI (a moto server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ser_ray.common import storage


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_location")


def test_join_keeps_a_uri_a_uri():
    assert storage.join("s3://bucket/run/", "a", "b.txt") == "s3://bucket/run/a/b.txt"
    assert storage.parent("s3://bucket/run/a") == "s3://bucket/run"
    assert storage.base_name("s3://bucket/run/a/") == "a"
    assert storage.join("/x/y", "z") == "/x/y/z" and storage.parent("/x/y") == "/x"
    assert storage.absolute("s3://bucket/run/") == "s3://bucket/run"
    assert storage.absolute("rel") == str(Path("rel").resolve())


def test_files_and_folders_round_trip(location, tmp_path):
    assert not storage.exists(location) and storage.list_names(location) == []
    storage.write_text(storage.join(location, "a", "x.json"), '{"k": 1}')
    assert storage.read_text(storage.join(location, "a", "x.json")) == '{"k": 1}'
    assert storage.list_names(location) == ["a"]
    with storage.staged(storage.join(location, "plots")) as local:
        (local / "one.png").write_bytes(b"png")
        (local / "deep").mkdir()
        (local / "deep" / "two.txt").write_text("2")
    assert storage.list_names(storage.join(location, "plots")) == ["deep", "one.png"]
    assert storage.read_text(storage.join(location, "plots", "deep", "two.txt")) == "2"
    storage.replace_dir(storage.join(location, "plots"), storage.join(location, "final"))
    assert storage.list_names(location) == ["a", "final"]
    copy = storage.download(storage.join(location, "final"), tmp_path / "copy")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == [
        "deep",
        "deep/two.txt",
        "one.png",
    ]
    storage.delete(storage.join(location, "final"))
    storage.delete(storage.join(location, "missing"))  # nothing there is fine
    assert storage.list_names(location) == ["a"]


def test_a_uri_folder_is_read_from_one_copy_per_node(s3_location, tmp_path, monkeypatch):
    monkeypatch.setenv("SER_RAY_CACHE", str(tmp_path / "cache"))
    model = storage.join(s3_location, "models", "m-abc")
    storage.write_text(storage.join(model, "config.json"), "{}")
    local = storage.node_local(model)
    assert Path(local, "config.json").read_text() == "{}"
    assert Path(local).parent == tmp_path / "cache" / "remote"
    storage.delete(model)  # published copies never change: the node's copy is reused
    assert storage.node_local(model) == local
    assert storage.node_local(str(tmp_path)) == str(tmp_path)  # a local folder as it is
