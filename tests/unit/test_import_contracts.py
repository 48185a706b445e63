"""The import layers of pyproject.toml's import-linter contracts hold, and would catch a breach.

`make test` runs `lint-imports` on the tree; these tests also run it on a copy of the tree with
one planted violation per contract, so a contract that silently stopped checking anything (a
renamed package, a typo in a module name) fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("configs", "market", "models", "serve", "cluster", "jobs", "bench")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages' sources and pyproject.toml, copied (no data, no caches)."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            tree / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "*.yml", "*.json", "*.md"),
        )
    return tree


def test_the_tree_keeps_every_contract(tree_copy: Path) -> None:
    result = _lint(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("market/lake.py", "import models.registry", "Layers"),
        ("models/registry.py", "import serve.app", "Layers"),
        ("serve/api/routes.py", "import jobs.pipeline", "Nothing imports the job CLIs"),
        ("bench/serve.py", "import jobs.deploy", "Nothing imports the job CLIs"),
        ("cluster/spark.py", "import models.registry", "cluster sits beside serve"),
        ("models/sweep.py", "import cluster.ray_runtime", "do not depend on the cluster tooling"),
        ("serve/dashboard/app.py", "import serve.api.routes", "independent"),
        ("serve/engine/engine.py", "import serve.api.auth", "independent"),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tree_copy: Path, tmp_path: Path, module: str, planted: str, contract: str
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(tree_copy, tree)
    target = tree / module
    target.write_text(target.read_text() + f"\n{planted}  # planted violation\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout
