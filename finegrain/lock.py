"""An exclusive lock on a run directory, so two processes never write one run.

The lock is an advisory ``flock`` on ``<dir>/.finegrain.lock``. The kernel releases it when the
holding process exits for any reason (``kill -9`` included), so a lock file left behind by a dead
run is stale by construction and the next run simply takes it. The file holds the holder's pid,
host and start time, which the refusal message names.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with RunLock(d):
...     try:
...         RunLock(d).acquire()
...     except RunLocked as e:
...         print("refused:", str(e).split(" is in use")[0] == d)
refused: True
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".finegrain.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, directory: str | os.PathLike, *, wait: bool = False):
        """``wait``: block until the holder is done instead of refusing (for shared caches)."""
        self.directory, self.wait = Path(directory), wait
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd, blocking=self.wait)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.directory} is in use by another finegrain process ({holder}); "
                            f"wait for it, stop it, or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


try:
    import fcntl

    def _lock(fd: int, blocking: bool = False) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
except ImportError:  # Windows: msvcrt byte-range lock, also dropped when the process exits
    import msvcrt

    def _lock(fd: int, blocking: bool = False) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
