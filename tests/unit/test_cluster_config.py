"""ray-cluster.yaml: valid for Ray's own cluster-config schema, the node types the platform needs,
and the image / set-up commands consistent with the Dockerfile and the pins."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO
from tests.unit.test_dockerfile import constraint_pins, instructions_of, project_pins, pyproject

CLUSTER_YAML = REPO / "ray-cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    return loaded


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(RAY_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator: jsonschema.protocols.Validator, config: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(config)
    ]


def test_valid_for_the_schema_ray_ships(
    config: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    assert RAY_SCHEMA.is_file(), f"Ray's schema moved: {RAY_SCHEMA}"
    assert _errors(validator, config) == []


def test_the_schema_check_does_catch_mistakes(
    config: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    """The control: the same validator rejects typical slips."""
    typo = copy.deepcopy(config)
    typo["docker"]["pull_before_runs"] = True
    fractional_gpu = copy.deepcopy(config)
    fractional_gpu["available_node_types"]["gpu_train"]["resources"]["GPU"] = 0.5
    no_node_config = copy.deepcopy(config)
    del no_node_config["available_node_types"]["cpu_etl"]["node_config"]
    for broken in (typo, fractional_gpu, no_node_config):
        assert _errors(validator, broken), "a broken config passed the schema"


def test_accepted_by_rays_own_loader(config: dict[str, Any]) -> None:
    """What `ray up` does before launching: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # Our explicit command lists replace Ray's AWS defaults (which pip-install a nightly Ray when
    # `ray` is missing, and an unpinned boto3 on the head); Ray runs setup_commands first.
    setup = config["setup_commands"]
    assert prepared["setup_commands"] == setup
    assert prepared["head_setup_commands"] == setup + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == setup + config["worker_setup_commands"]
    every_command = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "ray-wheels" not in every_command and "boto3>=" not in every_command


def test_node_types_head_cpu_etl_and_gpu_training(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and types[head].get("max_workers", 0) == 0
    workers = {name: spec for name, spec in types.items() if name != head}

    gpu = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    assert list(gpu) == ["gpu_train"], "one GPU worker type, for Ray Train / Tune trials"
    gpu_spec = gpu["gpu_train"]
    assert gpu_spec["resources"]["GPU"] >= 1 and gpu_spec["resources"]["CPU"] >= 1
    assert re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p5)\.", gpu_spec["node_config"]["InstanceType"])
    assert gpu_spec["min_workers"] == 0, "GPUs cost money: scale from zero"

    cpu = {name: spec for name, spec in workers.items() if name not in gpu}
    assert list(cpu) == ["cpu_etl"], "CPU workers for ingestion and the Spark ETL"
    etl = cpu["cpu_etl"]
    assert "GPU" not in etl["resources"] and etl["resources"]["CPU"] >= 4
    assert etl["min_workers"] >= 1 and etl["max_workers"] >= etl["min_workers"]
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]


def test_images_are_the_dockerfiles_builds_at_the_project_version(config: dict[str, Any]) -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    version = project["version"]
    docker = config["docker"]
    repository, _, tag = docker["image"].rpartition(":")
    assert repository.rsplit("/", 1)[-1] == "quant-ai" and tag == version
    gpu_image = config["available_node_types"]["gpu_train"]["docker"]["worker_image"]
    assert gpu_image == f"{repository}:{version}-gpu"
    assert (
        "--gpus all" in config["available_node_types"]["gpu_train"]["docker"]["worker_run_options"]
    )
    # The GPU image is the same Dockerfile with a CUDA torch index (same torch pin).
    assert any(item.args.startswith("TORCH_INDEX_URL=") for item in instructions_of("ARG"))
    # docker mode of the launcher: rsync into the container, ssh from the head's autoscaler.
    apt = " ".join(item.args for item in instructions_of("RUN") if "apt-get install" in item.args)
    assert "rsync" in apt.split() and "openssh-client" in apt.split()


def test_setup_commands_check_the_images_pins(config: dict[str, Any]) -> None:
    """The image is checked on every node, against the versions pyproject.toml pins."""
    check = " ".join(config["setup_commands"])
    pins = project_pins()
    for module, package in (("ray", "ray"), ("raydp", "raydp"), ("pyspark", "pyspark")):
        assert f"{module}.__version__ == '{pins[package]}'" in check, package
    assert f"torch.__version__.split('+')[0] == '{pins['torch']}'" in check
    [base] = instructions_of("FROM")
    major, minor = re.findall(r"python:(\d+)\.(\d+)", base.args)[0]
    assert f"sys.version_info[:2] == ({major}, {minor})" in check
    assert "openjdk-17" in " ".join(item.args for item in instructions_of("RUN"))
    assert "java -version 2>&1 | grep -q '\"17\\.'" in config["setup_commands"]


def test_nothing_installed_on_the_nodes_is_unpinned_or_off_the_lock(config: dict[str, Any]) -> None:
    locked = constraint_pins()
    commands = [
        command
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        for command in config[key]
    ]
    for spec in config["available_node_types"].values():
        commands += spec.get("worker_setup_commands", []) + spec.get("initialization_commands", [])
    installs = [command for command in commands if re.search(r"\bpip\s+install\b", command)]
    for command in installs:
        words = command.split()
        packages = [
            word for word in words[words.index("install") + 1 :] if not word.startswith("-")
        ]
        for package in packages:
            requirement = Requirement(package)
            [specifier] = list(requirement.specifier)
            assert specifier.operator == "==", f"unpinned install on the nodes: {package}"
            locked_version = locked.get(canonicalize_name(requirement.name))
            assert locked_version in (None, specifier.version), (package, locked_version)


def test_head_serves_the_jobs_api_and_metrics(config: dict[str, Any]) -> None:
    """Airflow (cluster/airflow/) submits to the dashboard's Jobs API on the head, port 8265."""
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "--dashboard-port" not in head  # the default, 8265, as the DAG's docs say
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--metrics-export-port=8080" in " ".join(config[key]), key
    assert (
        "ulimit -n 65536" in head
        and "--ulimit nofile=65536:65536" in config["docker"]["run_options"]
    )


def test_every_node_reaches_the_object_store_without_credentials_in_the_file(
    config: dict[str, Any],
) -> None:
    """The lake and the registry are object-store URIs shared by every node: each container gets
    the store's region and endpoint, each worker an instance profile for the bucket (the head
    has Ray's own), and no key is ever written here."""
    options = dict(
        option.removeprefix("--env ").split("=", 1)
        for option in config["docker"]["run_options"]
        if option.startswith("--env ")
    )
    assert options["AWS_REGION"] == config["provider"]["region"]
    assert options["AWS_ENDPOINT_URL"] == f"https://s3.{config['provider']['region']}.amazonaws.com"
    head = config["head_node_type"]
    for name, spec in config["available_node_types"].items():
        profile = spec["node_config"].get("IamInstanceProfile")
        if name == head:
            assert profile is None, "the head keeps the profile Ray's launcher gives it"
        else:
            assert profile == {"Name": "quant-ai-storage"}, name
    text = CLUSTER_YAML.read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text
