"""Output places checked before any work starts: a folder that can be written, a file that may be written.

Each command calls these on what it will write (the run folder, --out) before loading a model or reading
data, so a wrong place costs one line and exit code 2, not a traceback after the work. Writability is
probed by creating and removing a file, which is what the command will do: permission bits alone mislead
(root, ACLs, read-only mounts).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output place that cannot be used (a file where a folder must be, not writable); names it."""


def _why(e: OSError) -> str:
    """What follows "<what> <path> " in the message."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "is not writable (permission denied)"
    if e.errno == errno.EROFS:
        return "is on a read-only file system"
    if e.errno == errno.ENOSPC:
        return "is on a full file system"
    return f"cannot be written: {e.strerror or type(e).__name__}"


def check_writable_dir(path: str | os.PathLike, what: str, create: bool = True) -> Path:
    """`path` as a folder this process can write in, created when missing (create=True).

    OutputError naming `what` (e.g. "run.dir" or "--out") when it is a file, cannot be created, or cannot be
    written in.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    if not path.exists():
        if not create:
            return path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a parent is a file
            raise OutputError(f"{what} {path} cannot be created: a part of the path is a file") from None
        except OSError as e:
            denied = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            why = f"its folder {_why(e)}" if denied else e.strerror
            raise OutputError(f"{what} {path} cannot be created: {why}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    except OSError as e:
        raise OutputError(f"{what} {path} {_why(e)}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_writable_file(path: str | os.PathLike, what: str, overwrite: bool = True) -> Path:
    """`path` as a file this process can write: its folder writable (created when missing), not a folder.

    overwrite=False refuses an existing file (OutputError naming `what`), so results are never replaced
    silently.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder, not a file")
    if path.exists():
        if not overwrite:
            raise OutputError(f"{what} {path} exists; give another path or --overwrite to replace it")
        try:
            with open(path, "ab"):  # opens for writing without changing a byte
                pass
        except OSError as e:
            raise OutputError(f"{what} {path} {_why(e)}") from None
    check_writable_dir(path.parent, f"{what} {path}: its folder")
    return path
