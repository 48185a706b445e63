"""deploy/k8s/: the KubeRay RayService of the signal API and the RayJob of the pipeline.

No cluster here, so what can drift is checked statically: each custom resource against the
openAPIV3Schema of KubeRay's CRD (vendored in tests/data/kuberay/, v1.7.0; unknown fields are
an error, as with `kubectl apply`'s default strict field validation), every pod template and
plain object against the Kubernetes schemas (kubernetes-validate, strict), and the manifests
against the code they run: the job command lines against the job CLIs' own parsers and against
the command lines `cluster.ray_jobs` submits, the Serve import path and config against the
application, the ports, the image and the Ray version against pyproject.toml and the Dockerfile,
and the storage environment against what pyarrow's S3 filesystem reads. KubeRay's CEL rules
(`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pyarrow.fs as pafs
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.ray_jobs import PipelineParams, stage_argv
from configs.schema import PipelineConfig, ServeConfig, TuneJobConfig, load_config
from serve.api.routes import ROUTES
from serve.ingress_env import ingress_env
from tests.conftest import REPO
from tests.unit.test_dockerfile import instructions_of, project_pins, pyproject
from tests.unit.test_ray_jobs import parse_with_real_cli

MANIFESTS = REPO / "deploy" / "k8s"
RAYSERVICE = MANIFESTS / "rayservice.yaml"
RAYJOB = MANIFESTS / "rayjob-pipeline.yaml"
CRD_SCHEMAS = REPO / "tests" / "data" / "kuberay"
KUBERNETES_VERSION = "1.36"
"""The Kubernetes API the manifests are checked against: the one KubeRay v1.7.0 is built on."""
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SERVING_PORT_NAME = "serve"
"""The container port KubeRay's serve Service targets (utils.ServingPortName)."""


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def custom_resource(path: Path) -> dict[str, Any]:
    [resource] = [document for document in documents(path) if document["apiVersion"] == "ray.io/v1"]
    return resource


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec = resource["spec"]
    cluster: dict[str, Any] = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    return cluster


def groups(resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(name, group spec)` of the head group and every worker group."""
    cluster = cluster_spec(resource)
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container: KubeRay runs `ray start` in the first one."""
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def ports_of(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def in_image(path: str) -> Path:
    """The repository file behind an absolute path in the image (the Dockerfile's WORKDIR)."""
    [workdir] = instructions_of("WORKDIR")
    prefix = workdir.args.rstrip("/") + "/"
    assert path.startswith(prefix), f"{path} is not under the image's WORKDIR {workdir.args}"
    return REPO / path.removeprefix(prefix)


# -- schemas --------------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others: the API server
    rejects unknown fields under strict field validation (kubectl's default) instead of pruning
    them, unless the schema preserves unknown fields."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / f"{kind.lower()}-v1.schema.json").read_text())
    # OpenAPI v3.0 schemas follow JSON Schema draft 4 (boolean exclusiveMinimum and so on).
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(closed(schema))


def crd_errors(resource: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in crd_validator(resource["kind"]).iter_errors(resource)
    ]


def kubernetes_errors(resource: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"]
    return []


def pod_template_errors(resource: dict[str, Any]) -> list[str]:
    """Each group's pod template, validated as the template of a core v1 PodTemplate."""
    errors = []
    for name, group in groups(resource):
        wrapper = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": group["template"],
        }
        errors += [f"{name}: {error}" for error in kubernetes_errors(wrapper)]
    return errors


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_custom_resources_are_valid_for_kuberays_crd(path: Path) -> None:
    resource = custom_resource(path)
    assert resource["kind"] in {"RayService", "RayJob"}
    assert crd_errors(resource) == []


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_pod_templates_and_plain_objects_are_valid_for_kubernetes(path: Path) -> None:
    assert pod_template_errors(custom_resource(path)) == []
    for document in documents(path):
        if document["apiVersion"] != "ray.io/v1":
            assert kubernetes_errors(document) == [], document["kind"]


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    def spec_typo(resource: dict[str, Any]) -> None:
        cluster_spec(resource)["enableInTreeAutoscale"] = True

    def replicas_as_text(resource: dict[str, Any]) -> None:
        cluster_spec(resource)["workerGroupSpecs"][0]["replicas"] = "two"

    def start_param_as_number(resource: dict[str, Any]) -> None:
        cluster_spec(resource)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    return [
        ("unknown field", spec_typo),
        ("wrong type", replicas_as_text),
        ("ray start parameter not a string", start_param_as_number),
    ]


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_the_schema_checks_do_catch_mistakes(path: Path) -> None:
    """The control: the same validators reject typical slips in the CR and its pods."""
    for what, mutate in _mutations():
        broken = copy.deepcopy(custom_resource(path))
        mutate(broken)
        assert crd_errors(broken), what
    for field, value in (("ports", [{"name": "serve"}]), ("livenesProbe", {}), ("tty", "yes")):
        broken = copy.deepcopy(custom_resource(path))
        ray_container(cluster_spec(broken)["headGroupSpec"])[field] = value
        assert pod_template_errors(broken), field
    broken = copy.deepcopy(custom_resource(path))
    ray_container(cluster_spec(broken)["headGroupSpec"])["resources"]["limits"]["cpu"] = []
    assert pod_template_errors(broken), "a list as a CPU limit"


# -- what every pod runs --------------------------------------------------------------------


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_ray_version_image_and_user_are_the_projects(path: Path) -> None:
    resource = custom_resource(path)
    assert cluster_spec(resource)["rayVersion"] == project_pins()["ray"]
    project = pyproject()["project"]
    assert isinstance(project, dict)
    cluster_image = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())["docker"]["image"]
    assert cluster_image.endswith(f"quant-ai:{project['version']}")
    user = instructions_of("USER")[-1].args.split(":")[0]
    for name, group in groups(resource):
        spec = group["template"]["spec"]
        for container in spec["containers"]:
            assert container["image"] == cluster_image, name
        assert str(spec["securityContext"]["runAsUser"]) == user, name


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_every_ray_container_has_requests_equal_to_limits(path: Path) -> None:
    """Ray takes a pod's CPUs and memory from its limits; requests below them would let the
    scheduler overcommit the node under Ray's feet."""
    for name, group in groups(custom_resource(path)):
        resources = ray_container(group)["resources"]
        assert {"cpu", "memory"} <= set(resources["limits"]), name
        assert resources["requests"] == resources["limits"], name


@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda path: path.name)
def test_every_pod_gets_the_object_store_from_the_environment(path: Path) -> None:
    launcher = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    region = launcher["provider"]["region"]
    for name, group in groups(custom_resource(path)):
        env = env_of(ray_container(group))
        assert set(STORAGE_ENV) <= set(env), name
        for key in SECRET_ENV:
            assert "value" not in env[key], f"{name}: {key} written into the manifest"
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key, name
        assert env["AWS_REGION"]["value"] == region, name
        # The same store as the nodes of Ray's cluster launcher.
        endpoint = f"--env AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']['value']}"
        assert endpoint in launcher["docker"]["run_options"], name


class _RecordingS3(BaseHTTPRequestHandler):
    """An S3 endpoint on loopback that refuses every request and records its Authorization."""

    authorizations: list[str]

    def _refuse(self) -> None:
        self.authorizations.append(self.headers.get("Authorization", ""))
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._refuse()

    def do_HEAD(self) -> None:
        self._refuse()

    def log_message(self, *args: object) -> None:
        pass


def test_the_storage_environment_is_what_pyarrows_s3_filesystem_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lake and registry URIs open through pyarrow: with only the manifests' variables set
    (the endpoint pointed at a loopback server), a request reaches that endpoint signed with the
    access key for the region."""
    env = env_of(ray_container(cluster_spec(custom_resource(RAYJOB))["headGroupSpec"]))
    handler = type("Handler", (_RecordingS3,), {"authorizations": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    values = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_REGION": env["AWS_REGION"]["value"],
        "AWS_ACCESS_KEY_ID": "AKIAQUANTAITEST",
        "AWS_SECRET_ACCESS_KEY": "not-a-secret",
    }
    for name in STORAGE_ENV:
        assert name in env
        monkeypatch.setenv(name, values[name])
    try:
        filesystem, path = pafs.FileSystem.from_uri("s3://quant-ai/registry")
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            filesystem.get_file_info(path)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.authorizations, "no request reached the endpoint of AWS_ENDPOINT_URL"
    region = re.escape(values["AWS_REGION"])
    pattern = rf"Credential=AKIAQUANTAITEST/\d{{8}}/{region}/s3/aws4_request"
    assert re.search(pattern, handler.authorizations[0]), handler.authorizations[0]


# -- the RayService -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return custom_resource(RAYSERVICE)


def serve_app(rayservice: dict[str, Any]) -> tuple[ServeDeploySchema, Path, ServeConfig]:
    """The Serve config file of the RayService, its one application's ServeConfig file in the
    repository and that config."""
    schema = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    [app] = schema.applications
    path = in_image(app.args["config"])
    return schema, path, load_config(path, ServeConfig)


def test_serve_config_builds_the_signal_application(rayservice: dict[str, Any]) -> None:
    import serve.app

    schema, path, _ = serve_app(rayservice)
    [app] = schema.applications
    assert app.route_prefix == "/"
    module_name, attribute = app.import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert builder is serve.app.app_builder
    assert type(builder({"config": str(path)})).__name__ == "Application"


def test_ports_and_probes_match_the_serve_config(rayservice: dict[str, Any]) -> None:
    schema, _, config = serve_app(rayservice)
    assert schema.http_options.port == config.port == ServeConfig.model_fields["port"].default
    assert schema.http_options.host == config.host == "0.0.0.0"
    assert config.operator.bind_address == "0.0.0.0", "the operator port must be scrapeable"
    workers = [group for name, group in groups(rayservice) if name != "head"]
    assert workers
    for group in workers:
        container = ray_container(group)
        ports = ports_of(container)
        assert ports[SERVING_PORT_NAME] == config.port
        assert ports["operator"] == config.operator.port
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(config.operator.port)
        assert annotations["prometheus.io/path"] == "/metrics"
        # KubeRay's own readiness check of RayService workers runs wget: not in the image.
        probe = container["readinessProbe"]
        assert set(probe) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"httpGet"}
        assert probe["httpGet"]["path"] in ROUTES
        assert probe["httpGet"]["path"] == "/readyz"
        assert probe["httpGet"]["port"] in (SERVING_PORT_NAME, config.port)
    apt = " ".join(item.args for item in instructions_of("RUN") if "apt-get install" in item.args)
    assert "wget" not in apt.split(), "with wget in the image KubeRay's probe would do"
    head_ports = ports_of(ray_container(cluster_spec(rayservice)["headGroupSpec"]))
    assert head_ports["dashboard"] == 8265 and head_ports[SERVING_PORT_NAME] == config.port


def test_every_pod_has_the_api_secrets_and_the_clients_file(rayservice: dict[str, Any]) -> None:
    """An ingress or engine replica may land on any pod (Serve places them)."""
    _, _, config = serve_app(rayservice)
    assert config.auth.jwt.algorithm == "HS256" and config.auth.jwt.secret_file is None
    clients_dir = str(Path(config.auth.clients_file).parent)
    assert config.ingress_mode == "proxy"
    gold_has_no_password = re.fullmatch(r"postgresql\+psycopg://[^:@/]+@[^/]+/\w+", config.gold.url)
    assert gold_has_no_password, config.gold.url
    assert config.registry.startswith("s3://")
    for name, group in groups(rayservice):
        container = ray_container(group)
        env = env_of(container)
        assert "secretKeyRef" in env[config.auth.jwt.secret_env]["valueFrom"], name
        assert "secretKeyRef" in env["PGPASSWORD"]["valueFrom"], name
        for key, value in ingress_env(config.ingress_mode).items():
            assert env[key]["value"] == value, name
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == clients_dir]
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        assert "secret" in volumes[mount["name"]] and mount.get("readOnly") is True, name


# -- the RayJob -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return custom_resource(RAYJOB)


def job_commands(entrypoint: str) -> tuple[str, list[list[str]]]:
    """The working directory and the stage command lines the Ray job runs.

    KubeRay pastes the entrypoint into its submitter's shell command (`ray job submit ... --
    <entrypoint>`), Ray's CLI joins the words it gets with `subprocess.list2cmdline`, and the
    job supervisor runs that line in a shell: each step is followed here.
    """
    submitted = subprocess.list2cmdline(shlex.split(entrypoint))
    argv = shlex.split(submitted)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, (
        "the stages chained under bash -c, so that the Ray job (not the submitter) runs them"
    )
    steps = [shlex.split(step) for step in argv[2].split("&&")]
    assert steps[0][0] == "cd" and len(steps[0]) == 2, "first: cd into the shared volume"
    return steps[0][1], steps[1:]


def test_the_job_runs_the_stages_in_order_with_the_job_clis_flags(
    rayjob: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, commands = job_commands(rayjob["spec"]["entrypoint"])
    assert [argv[2] for argv in commands] == ["jobs.ingest", "jobs.features", "jobs.tune"]
    ingest, features, tune = (parse_with_real_cli(shlex.join(a), monkeypatch) for a in commands)
    assert ingest.lake == features.lake == tune.lake
    assert ingest.lake.startswith("s3://") and tune.registry.startswith("s3://")
    assert ingest.source == "binance"
    # The same command lines as the stages that cluster.ray_jobs submits (Airflow, --ray-jobs).
    params = PipelineParams(
        lake=ingest.lake,
        registry=tune.registry,
        source=ingest.source,
        symbols=tuple(ingest.symbols.split(",")),
        start=ingest.start,
        pipeline_config=None,
        executors=features.executors,
        tune_config=tune.config,
    )
    expected = stage_argv(params)
    assert commands == [expected["ingest"], expected["features"], expected["tune"]]


def test_the_sweeps_run_directory_is_one_volume_on_every_pod(rayjob: dict[str, Any]) -> None:
    """jobs.tune writes runs/tune-<time> under its working directory: Tune's storage, which
    the trials on every worker must share."""
    workdir, _ = job_commands(rayjob["spec"]["entrypoint"])
    [claim] = [doc for doc in documents(RAYJOB) if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, group in groups(rayjob):
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        [mount] = [m for m in ray_container(group)["volumeMounts"] if m["mountPath"] == workdir]
        assert (
            volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            == (claim["metadata"]["name"])
        ), name


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    units |= {"g": 2**30, "m": 2**20}  # Spark's memory strings
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity)
    assert match, quantity
    return float(match[1]) * units.get(match[2], 1)


def test_the_workers_fit_a_spark_executor_and_a_training_worker(
    rayjob: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Spark executor or a Ray Train worker larger than every worker pod waits forever."""
    _, commands = job_commands(rayjob["spec"]["entrypoint"])
    features = parse_with_real_cli(shlex.join(commands[1]), monkeypatch)
    tune = parse_with_real_cli(shlex.join(commands[2]), monkeypatch)
    spark = load_config(in_image(features.config), PipelineConfig) if features.config else None
    spark = spark or PipelineConfig()
    sweep = load_config(in_image(tune.config), TuneJobConfig)
    workers = [ray_container(group) for name, group in groups(rayjob) if name != "head"]
    limits = [container["resources"]["limits"] for container in workers]
    assert max(_cpus(limit["cpu"]) for limit in limits) >= max(
        spark.spark.executor_cores, sweep.scaling.cpus_per_worker
    )
    assert max(_bytes(limit["memory"]) for limit in limits) >= _bytes(spark.spark.executor_memory)
    if sweep.scaling.use_gpu:
        assert any("nvidia.com/gpu" in limit for limit in limits), "a GPU sweep, no GPU worker"
    head = cluster_spec(rayjob)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the drivers only"
    head_memory = _bytes(ray_container(head)["resources"]["limits"]["memory"])
    assert head_memory >= 2 * _bytes(spark.spark.driver_memory), "the Spark driver runs there"
