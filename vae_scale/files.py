"""Files: small writes that are atomic, disk space, and output places checked before any work starts (a
folder that can be written, a file that may be written).

Each command calls these on what it will write (the run folder, --out) before loading a model or reading
data, so a wrong place costs one line and exit code 2, not a traceback after the work. Writability is
probed by creating and removing a file, which is what the command will do: permission bits alone mislead
(root, ACLs, read-only mounts).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

PROBE = ".write-test-"


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
        fd, probe = tempfile.mkstemp(prefix=PROBE, dir=path)
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


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_dir(
    path: str | os.PathLike, what: str, overwrite: bool = False, reads: Iterable[str | os.PathLike] = ()
) -> Path:
    """`path` as a folder for a command's output: writable (created when missing), and empty unless
    overwrite. OutputError naming `what` otherwise, and always when it is one of the folders the command
    reads (`reads`: replacing a source while reading it loses it).
    """
    path = Path(path)
    for source in reads:
        if _same(path, Path(source)):
            raise OutputError(f"{what} {path} is the folder being read ({source}): give another folder")
    # another process's probe (check_writable_dir) is no output
    if path.is_dir() and not overwrite and any(not p.name.startswith(PROBE) for p in path.iterdir()):
        raise OutputError(f"{what} {path} is not empty; give another folder, or --overwrite to replace it")
    return check_writable_dir(path, what)


def check_output_file(
    path: str | os.PathLike, what: str, overwrite: bool = False, reads: Iterable[str | os.PathLike] = ()
) -> Path:
    """`path` as a file for a command's output (check_writable_file, an existing one refused unless
    overwrite); OutputError always when it is a file the command reads or lies in a folder it reads."""
    path = Path(path)
    for source in reads:
        source = Path(source)
        if _same(path, source) or (source.is_dir() and _inside(path, source)):
            where = "in the folder being read" if source.is_dir() else "the file being read"
            raise OutputError(f"{what} {path} is {where} ({source}): give another path")
    return check_writable_file(path, what, overwrite=overwrite)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a small file so that readers see the old content or the new one, never a mix.

    A write that fails (a full disk) leaves the old file as it was and no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or, when it does not
    exist yet, its nearest existing parent)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    st = os.statvfs(existing)
    return st.f_bavail * st.f_frsize


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, at any depth."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    """A byte count the way the messages write it: 812 KiB, 3.4 MiB, 1.27 GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"
