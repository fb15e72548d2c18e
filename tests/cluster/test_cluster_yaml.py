"""``cluster.yaml`` is a valid Ray cluster-launcher config with the layout the jobs rely on.

Fast and offline: the YAML is validated against the JSON schema shipped inside the installed Ray wheel
(``ray/autoscaler/ray-schema.json``); no Ray is started and no cloud API is called.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    assert SCHEMA_PATH.is_file(), f"Ray's cluster schema not found at {SCHEMA_PATH}"
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _commands(config: dict) -> list[str]:
    """Every shell command that runs on a node, global and per node type."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        for k in ("initialization_commands", "worker_setup_commands"):
            commands += node_type.get(k) or []
    return commands


def _worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_valid_against_ray_schema(config, schema):
    jsonschema.validate(config, schema)


def test_head_node_has_no_gpu(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0 and head.get("min_workers", 0) == 0


def test_gpu_workers_autoscale(config):
    gpu_workers = {n: t for n, t in _worker_types(config).items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker node type declares resources: {GPU: >= 1}"
    for name, t in gpu_workers.items():
        assert "InstanceType" in t["node_config"], name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] <= config["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in _worker_types(config).values()) <= config["max_workers"]
    assert max(t["max_workers"] for t in gpu_workers.values()) >= 1


def test_setup_installs_the_project(config):
    setup = config["setup_commands"]
    mounts = config.get("file_mounts") or {}
    # the repository is uploaded (no repository host) and installed from there with the S3 extra
    remote = next(r for r, local in mounts.items() if local in (".", "./"))
    installs = [c for c in setup if re.search(r"\bpip install\b.*\blemmse_ray\b", c)]
    assert installs, "setup_commands do not `pip install` lemmse_ray"
    assert any(remote.replace("~", "").strip("/") in c and "[s3]" in c for c in installs), installs
    assert any(re.search(r"\bpip install\b.*torch", c) for c in setup)
    # installs come before Ray starts on the node (setup runs before *_start_ray_commands)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_object_store_location_is_set(config):
    found = [m.group(1) for c in _commands(config) for m in re.finditer(r"export LEMMSE_STORE=([^\s'\"]+)", c)]
    assert found, "LEMMSE_STORE is not set on the nodes"
    assert all(re.fullmatch(r"s3://[^/\s]+/\S*", url) for url in found), found
    # set for every node (global setup_commands), so every job driver inherits it
    assert any("export LEMMSE_STORE=" in c for c in config["setup_commands"])


def test_wrong_field_fails_validation(config, schema):
    """The schema check has power: a copy with a wrong type or an unknown key is rejected."""
    bad = copy.deepcopy(config)
    bad["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(config)
    worker = next(iter(_worker_types(bad)))
    bad["available_node_types"][worker]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(config)
    bad["setup_command"] = bad.pop("setup_commands")  # typo'd top-level key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_accepts_prepared_config(config):
    """Ray's own launcher checks (defaults filled in, node types consistent), still offline."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    assert prepared["head_node_type"] == config["head_node_type"]


def test_dashboard_and_job_api_on_loopback_only(config):
    """The job API runs submitted code: the head binds it to 127.0.0.1 (reached by port forwarding)."""
    starts = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert starts
    for command in starts:
        hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
        assert hosts == ["127.0.0.1"], command


def test_instance_profiles_are_named_not_ray_defaults(config):
    """Every node names its own instance profile: Ray's default one has EC2 and S3 full access."""
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} names no instance profile"
        assert "ray-autoscaler" not in str(profile), name
