"""Durable file operations: fsync a file, publish it by atomic rename, fsync the directory.

A rename is atomic on POSIX, but neither the new directory entry nor the file's data are durable until the
file and its directory have been fsync'd (see e.g. the LWN article "Ensuring data reaches disk"). The order
here is: data fsync -> rename -> directory fsync; only then may the caller record or acknowledge the object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_CHUNK_BYTES = 1 << 20
#: Extended attribute carrying what a file's index row needs beyond the file's own bytes (see ``store.py``).
ARRIVAL_XATTR = "user.rtqa.arrival"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path, *, root: Path) -> None:
    """Create ``path`` (below ``root``) and fsync each parent whose entries changed."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current == root or current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            pass
        fsync_dir(directory.parent)


def publish(temp_path: Path | str, final_path: Path | str, *, root: Path, known_dirs: set[str] | None = None) -> None:
    """Atomically move a fully written, fsync'd file into place, then make the new entry durable.

    If ``temp_path`` is on another file system (rename gives EXDEV) the data are copied into a temporary
    file beside ``final_path`` first, so the visible file still appears atomically. ``known_dirs``: directories
    already created durably by an earlier call (a cache the caller keeps; one that vanished is made again).
    """
    final_path = os.fspath(final_path)
    parent = os.path.dirname(final_path)
    if known_dirs is None or parent not in known_dirs:
        make_dirs_durable(Path(parent), root=root)
        if known_dirs is not None:
            known_dirs.add(parent)
    try:
        os.rename(temp_path, final_path)
    except FileNotFoundError:
        if known_dirs is None or parent not in known_dirs or not os.path.exists(temp_path):
            raise
        known_dirs.discard(parent)  # removed behind our back: create it again
        make_dirs_durable(Path(parent), root=root)
        os.rename(temp_path, final_path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staging = final_path + ".partial"
        shutil.copyfile(temp_path, staging)
        fsync_file(staging)
        os.rename(staging, final_path)
        os.unlink(temp_path)
    fsync_dir(parent)


def sha256_of(path: Path, *, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def set_arrival(path: Path, payload: bytes) -> None:
    """Attach ``payload`` to ``path`` as an extended attribute; made durable by the file's next fsync.

    Raises:
        OSError: the file system has no user extended attributes (ENOTSUP) or no room for them.
    """
    os.setxattr(path, ARRIVAL_XATTR, payload)


def get_arrival(path: Path) -> bytes | None:
    """The payload of :func:`set_arrival`, or None when the file has none (or the file system no xattrs)."""
    try:
        return os.getxattr(path, ARRIVAL_XATTR)
    except OSError:
        return None


def xattrs_supported(directory: Path) -> bool:
    """Whether files in ``directory`` can carry :data:`ARRIVAL_XATTR` (ext4, XFS, btrfs: yes)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".xattr-probe-")
    os.close(fd)
    try:
        set_arrival(Path(name), b"{}")
        return get_arrival(Path(name)) == b"{}"
    except OSError:
        return False
    finally:
        os.unlink(name)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
