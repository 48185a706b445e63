"""README.md's "On a cluster" commands, each held to the CLI that runs it and the files it names.

Nothing here can run them (no cloud account, no Kubernetes cluster), so each command line is
parsed by its real parser: Ray's and Serve's click commands, and for a submitted job the job
CLI's own argparse parser; the files they name are the ones the other tests validate. A command
of a kind not known here fails the test, so the section shows nothing unchecked.
"""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import urlparse

import click
import pytest
from ray.scripts.scripts import cli as ray_cli
from ray.serve.scripts import cli as serve_cli

from tests.conftest import REPO
from tests.unit.test_k8s_manifests import MANIFESTS
from tests.unit.test_ray_jobs import parse_with_real_cli
from tests.unit.test_serve_config_file import SERVE_FILE

CLUSTER_CONFIG = "ray-cluster.yaml"


def cluster_commands(readme: str) -> list[list[str]]:
    """The command lines of the code blocks of the section, continuation lines joined and
    comments dropped, as argument vectors."""
    section = readme.split("\n## On a cluster\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```$", section, re.M | re.S)
    assert blocks, "no code block in README.md's cluster section"
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line, comments=True))
    return commands


def click_params(group: click.Group, argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Resolve `argv` through `group`'s subcommands and parse it: click.UsageError (an unknown
    command or option, a missing argument) when the CLI would refuse it."""
    command: click.Command = group
    path = []
    while isinstance(command, click.Group):
        name, *argv = argv
        resolved = command.get_command(click.Context(command), name)
        assert resolved is not None, f"no command {' '.join([*path, name])}"
        command = resolved
        path.append(name)
    with command.make_context(" ".join(path), list(argv)) as context:
        return " ".join(path), dict(context.params)


@pytest.fixture(scope="module")
def commands() -> list[list[str]]:
    return cluster_commands((REPO / "README.md").read_text())


def test_every_command_is_accepted_by_its_cli_and_names_checked_files(
    commands: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[str] = []
    forwarded_port = None
    lakes, registries = set(), set()
    for argv in commands:
        if argv[0] == "ray":
            name, params = click_params(ray_cli, argv[1:])
            kinds.append(f"ray {name}")
            if name in ("up", "dashboard"):
                assert params["cluster_config_file"] == CLUSTER_CONFIG
                if name == "dashboard":
                    forwarded_port = params["port"]
            elif name == "job submit":
                assert forwarded_port is not None, "submit after `ray dashboard` forwards"
                assert urlparse(params["address"]).port == forwarded_port
                entrypoint = shlex.join(params["entrypoint"])
                job = parse_with_real_cli(entrypoint, monkeypatch)
                lakes.add(job.lake)
                registries.update({job.registry} if getattr(job, "registry", None) else set())
                config = getattr(job, "config", None)
                assert config is None or (REPO / config).is_file(), config
            else:
                pytest.fail(f"README.md shows an unchecked command: {shlex.join(argv)}")
        elif argv[0] == "serve":
            name, params = click_params(serve_cli, argv[1:])
            kinds.append(f"serve {name}")
            assert name == "deploy" and REPO / params["config_or_import_path"] == SERVE_FILE
        elif argv[:3] == ["kubectl", "apply", "-f"] and len(argv) == 4:
            kinds.append("kubectl apply")
            assert (REPO / argv[3]).parent == MANIFESTS and (REPO / argv[3]).is_file(), argv[3]
        else:
            pytest.fail(f"README.md shows an unchecked command: {shlex.join(argv)}")
    assert kinds.count("ray job submit") == 3 and "ray up" in kinds and "kubectl apply" in kinds
    assert len(lakes) == 1 and all(lake.startswith("s3://") for lake in lakes)
    assert len(registries) == 1 and all(uri.startswith("s3://") for uri in registries)


def test_every_manifest_is_shown(commands: list[list[str]]) -> None:
    applied = {argv[3] for argv in commands if argv[:2] == ["kubectl", "apply"]}
    assert applied == {str(path.relative_to(REPO)) for path in MANIFESTS.glob("*.yaml")}


def test_the_check_does_catch_a_wrong_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a misspelt option of each kind is refused."""
    with pytest.raises(click.UsageError):
        click_params(ray_cli, ["job", "submit", "--working-dirs", ".", "--", "python"])
    with pytest.raises(click.UsageError):
        click_params(serve_cli, ["deploy", "--adress", "x", str(SERVE_FILE)])
    with pytest.raises(SystemExit):
        parse_with_real_cli("python -m jobs.features --lakes s3://quant-ai/lake", monkeypatch)
