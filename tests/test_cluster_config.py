"""cluster.yaml is valid for Ray's cluster launcher (checked offline, no cloud credentials)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_schema(config):
    # what `ray up` does: fill in the provider's defaults, then validate against the schema
    validate_config(prepare_config(copy.deepcopy(config)))


def test_schema_catches_mistakes(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workerz"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):
        validate_config(prepare_config(broken))


def test_cluster_shape(config):
    head = config["available_node_types"][config["head_node_type"]]
    workers = config["available_node_types"]["gpu_worker"]
    assert "g5" in workers["node_config"]["InstanceType"] and workers["min_workers"] == 0
    assert workers["max_workers"] >= 1 and "g" not in head["node_config"]["InstanceType"][:1]
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"][1:])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
