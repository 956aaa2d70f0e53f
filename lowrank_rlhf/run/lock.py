"""One writer per run directory: RUN/.lowrank_rlhf.lock holds the writer's process id while it runs.

The lock is an `flock` on that file, so the kernel drops it when its process ends, however it ends (kill -9
included): a lock left by a dead process is taken over, never obeyed forever. Where the filesystem has no flock
(some network or FUSE mounts), the process id in the file decides: a live process keeps it, a dead one's is taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from .directory import LOCK_FILE, RunDirError

log = logging.getLogger(__name__)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _refuse(run_dir: Path, pid: int | None) -> RunDirError:
    who = f"process {pid}" if pid else "another process"
    return RunDirError(f"{run_dir} is in use by {who} ({LOCK_FILE}); wait for it to finish or stop it, or choose "
                       f"another --output-dir")


def check_free(run_dir: Path) -> None:
    """Refuse now, before any other check, when a live process holds the run directory (reads only)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # its holder just finished
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _refuse(run_dir, _read_pid(path)) from None
    except OSError:  # no flock here: the pid decides
        pid = _read_pid(path)
        if pid and pid != os.getpid() and _alive(pid):
            raise _refuse(run_dir, pid) from None
    finally:
        os.close(fd)


def _flock(path: Path) -> int | None:
    """An exclusive flock on the lock file that is on disk now; None where the filesystem has none."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(path.parent, _read_pid(path)) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # The previous holder removes the file when it ends: if it did so between our open and our flock, we
        # locked a file nobody else will open again; lock the one on disk instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def hold(run_dir: Path):
    """Hold the run directory's lock for the `with` block; refuse (RunDirError naming the pid) when it is taken."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _read_pid(path)
    fd = _flock(path)
    if fd is None and previous and previous != os.getpid() and _alive(previous):
        raise _refuse(run_dir, previous)
    if previous and previous != os.getpid():
        log.warning("%s: taking over the lock of process %d, which has ended", run_dir, previous)
    if fd is None:
        path.write_text(f"{os.getpid()}\n")
    else:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_pid(path) == os.getpid():
                path.unlink()  # before the unlock: a waiting process then locks a fresh file (see _flock)
        if fd is not None:
            os.close(fd)
