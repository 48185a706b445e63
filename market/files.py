"""Local file writes that survive crashes and power loss, and advisory locks between processes.

`write_durably` writes a temporary file beside the target, fsyncs it, renames it over the target
and fsyncs the directory: a reader sees the old file or the new one, never a mix, and once it
returns the new file survives a power loss. Temporaries are named `TMP_PREFIX<hex>.tmp`, so
whoever owns a folder can find the leftovers of a killed writer. `exclusive_lock` is an `flock`
on a lock file: held by an open file descriptor, so a killed holder frees it.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

TMP_PREFIX: Final = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (new names, renames) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path, mode: int = 0o777) -> None:
    """`mkdir -p` whose new directories survive a power loss: each parent is synced after.
    `mode` is that of `os.mkdir` (the umask applies)."""
    missing: list[Path] = []
    node = directory
    while not node.exists():
        missing.append(node)
        node = node.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            continue  # another writer made it; it syncs the parent
        fsync_dir(path.parent)


def write_durably(target: Path, text: str, mode: int = 0o666) -> None:
    """`write_bytes_durably` of `text` in UTF-8."""
    write_bytes_durably(target, text.encode("utf-8"), mode)


def write_bytes_durably(target: Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to a synced temporary beside `target`, rename it to `target`, then sync the
    directory. `mode` is the new file's (the umask applies, as to `open`); the temporary is
    removed if the write fails."""
    temporary = target.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `path` (created if absent); yields False, holding
    nothing, when `wait` is False and another open file holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
