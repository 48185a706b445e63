"""Fixtures of the integration tests: a real PostgreSQL server for the Gold store."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.postgres import PostgresUnavailableError, start_postgres


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of database ``gold_test`` on a PostgreSQL server started for the session.

    The cluster lives in its own directory of the system temp dir rather than pytest's tmp_path:
    the server runs as the ``postgres`` user, and pytest makes ``/tmp/pytest-of-root`` 0700
    again whenever another session starts.
    """
    base_dir = Path(tempfile.mkdtemp(prefix="quant-ai-postgres-"))
    try:
        try:
            url, stop = start_postgres(base_dir)
        except PostgresUnavailableError as exc:
            pytest.skip(f"no PostgreSQL server for the Gold store tests: {exc}")
        try:
            yield url
        finally:
            stop()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
