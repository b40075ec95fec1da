"""cluster.yaml passes Ray's own cluster-launcher validation, and keeps its promises."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def prepared(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation():
    config = prepared(yaml.safe_load(CLUSTER_YAML.read_text()))
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1


def test_ray_validation_rejects_a_broken_copy():
    import jsonschema

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        prepared(raw)


def test_pins_versions_keeps_secrets_out_and_the_dashboard_private():
    text = CLUSTER_YAML.read_text()
    raw = yaml.safe_load(text)
    setup = " ".join(raw["setup_commands"])
    assert "ray[tune,train,default]==2.60.0" in setup and "torch==2.13.0" in setup
    assert "-c ~/distributed_je/constraints.txt" in setup
    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key).lower()
                yield from keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys(value)
    assert not [k for k in keys(raw) if "secret" in k or "access_key" in k or "password" in k]
    assert "AWS_SECRET" not in setup and "AWS_ACCESS" not in setup
    assert all(n["node_config"].get("IamInstanceProfile") for n in raw["available_node_types"].values())
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
