"""Atomic output: write to a temporary name beside the target, then rename.

A crash or SIGKILL mid-write leaves at most a ``.part`` file or a ``.partial-<pid>`` folder, never an output
that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        yield partial
        if partial.exists():
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as partial:
        partial.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a new empty folder ``<target>.partial-<pid>``; if the block succeeds it takes ``target``'s place.

    An existing ``target`` stays whole until then (it is moved aside, the new folder renamed in, the old one
    removed); if the block fails, the partial folder goes and ``target`` is as it was. Partial folders that
    processes which died (SIGKILL, power loss) left beside ``target`` are removed first; a live one's are kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.mkdir()
    try:
        yield partial
        previous = target.with_name(f"{target.name}.previous-{os.getpid()}")
        had_previous = target.exists() or target.is_symlink()
        if had_previous:
            os.replace(target, previous)
        try:
            os.replace(partial, target)
        except BaseException:
            if had_previous:
                os.replace(previous, target)
            raise
        if had_previous:
            _remove(previous)
    finally:
        if partial.exists():
            _remove(partial)


def remove_stale_partials(target: str | os.PathLike[str]) -> None:
    """Removes ``<target>.partial-<pid>`` folders of processes that are gone (or of this very process)."""
    target = Path(target)
    for leftover in target.parent.glob(f"{target.name}.partial-*"):
        suffix = leftover.name.rsplit("-", 1)[-1]
        if not suffix.isdigit() or not leftover.is_dir():
            continue
        pid = int(suffix)
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that writer is still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        _remove(leftover)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike[str], *, what: str) -> Iterator[None]:
    """Holds an exclusive lock on ``lock_file`` (created if missing) for the block; refuses when another process
    holds it. ``what`` names the guarded folder in the message.

    ``flock`` locks die with their process (SIGKILL included), so a crashed run never leaves a stale lock; the
    file itself stays (deleting it would let a third process lock a different inode).
    """
    import fcntl

    from rkedge.errors import InputError

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+", encoding="utf-8")  # held open (and locked) for the whole block
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputError(f"{what} is in use by {holder}; two runs writing into one folder would mix their "
                             "outputs.", fix="wait for that run to finish, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"rkedge (pid {os.getpid()})")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def format_size(size: float) -> str:
    """Bytes as a person reads them: ``512 B``, ``14.2 MB``, ``3.07 GB`` (decimal units, as ``df -H``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def folder_size(folder: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``folder``, a hard-linked file counted once (exports link unchanged checkpoints)."""
    sizes: dict[tuple[int, int], int] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                st = os.lstat(os.path.join(root, name))
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def free_space(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """The nearest existing folder at or above ``path`` and the bytes free on its filesystem."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_free_space(path: str | os.PathLike[str], need: int, *, what: str) -> None:
    """Refuses, before any byte is written, a job whose ``need`` bytes do not fit where ``path`` lives."""
    from rkedge.errors import InputError

    folder, free = free_space(path)
    if free < need:
        raise InputError(f"{what} needs about {format_size(need)} in {folder}, which has {format_size(free)} free.",
                         fix=f"free at least {format_size(need - free)} there, or choose a folder on another disk",
                         code="disk_full")


#: errno -> (what happened, what to do, error code).
_OS_ERRORS: dict[int, tuple[str, str, str]] = {
    errno.ENOSPC: ("the disk is full", "free space there (or choose a folder on another disk) and run again",
                   "disk_full"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota, or choose another folder",
                   "disk_full"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable folder (e.g. under your home folder)",
                  "read_only"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions", "permission_denied"),
    errno.EPERM: ("the operation is not permitted", "choose a folder you own, or fix its permissions",
                  "permission_denied"),
    errno.ENOENT: ("no such file or folder", "check the path", "not_found"),
    errno.EISDIR: ("it is a folder, a file was expected", "pass a file path", "invalid_path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path", "invalid_path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n) and run again", "os_error"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path", "invalid_path"),
}


def os_error_message(exc: OSError) -> tuple[str, str, str]:
    """(message, fix, code) for an OS error that reached an edge: the path, what happened, the space free when
    a disk filled up."""
    reason, fix, code = _OS_ERRORS.get(exc.errno or -1, (exc.strerror or str(exc), "check the path and run again",
                                                         "os_error"))
    if exc.filename is None:
        message = reason[:1].upper() + reason[1:]
    elif code in ("disk_full", "read_only", "permission_denied"):
        message = f"cannot write {exc.filename}: {reason}"
    else:
        message = f"{exc.filename}: {reason}"
    if code == "disk_full" and exc.filename:
        folder, free = free_space(exc.filename)
        message += f" ({folder} has {format_size(free)} free)"
    return message + ".", fix, code
