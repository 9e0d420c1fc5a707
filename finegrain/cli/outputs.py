"""Check command-line paths before the work starts, and write output files atomically.

A command that computes for minutes and then fails to write its result has thrown the work
away. The commands call these checks right after parsing, before loading any model:

* :func:`check_output_dir` — ``--out DIR`` (a report or run directory);
* :func:`check_output_file` — ``--out FILE`` (a single output file);
* :func:`check_input_file` — ``--data FILE`` and similar inputs.

Each raises ``ValueError`` with one line ``"FLAG: 'PATH' PROBLEM"``, which the commands print as
their usual one-line error with exit status 2.

Writability is tested by creating and removing a probe file, not with ``os.access``: a process
running as root passes ``os.access(W_OK)`` on a read-only directory but may still be refused
(read-only file system, a path under a regular file), and the probe asks the file system itself.

:func:`atomic_write_text` and :func:`atomic_writer` write to a temporary file in the target's
directory and ``os.replace`` it onto the target, so a crash mid-write leaves the previous file
(or no file) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

_PROBE_PREFIX = ".finegrain-probe-"


def _first_line(err: OSError) -> str:
    """The reason of an OSError without its path (the message already names the path)."""
    if err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (``.`` for a relative path)."""
    p = path
    while not p.exists():
        if p.parent == p:  # a root that does not exist: cannot happen on a sane system
            return p
        p = p.parent
    return p


def _probe_writable(flag: str, shown: str, directory: Path) -> None:
    """Create and remove a probe file in ``directory``; ValueError naming ``flag`` if refused."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=directory)
    except OSError as err:
        where = "" if str(directory) == shown else f" ('{directory}')"
        raise ValueError(f"{flag}: '{shown}': cannot write there{where}: {_first_line(err)}") from None
    os.close(fd)
    os.unlink(probe)


def _check_creatable(flag: str, shown: str, path: Path) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable directory."""
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise ValueError(f"{flag}: '{shown}': cannot be created, '{anc}' is not a directory")
    _probe_writable(flag, shown, anc)


def check_output_dir(flag: str, path: str | os.PathLike, *, create: bool = False) -> Path:
    """Check that ``path`` can serve as an output directory; return it as a Path.

    It must be an existing writable directory, or not exist with its nearest existing ancestor
    a writable directory (so it can be created). With ``create``, it is then created (with its
    parents). Raises ValueError ``"FLAG: 'PATH' ..."`` naming the problem: an existing
    non-directory, an ancestor that is a regular file, or a directory that refuses a new file.
    """
    shown = os.fspath(path)
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ValueError(f"{flag}: '{shown}' exists and is not a directory")
        _probe_writable(flag, shown, p)
    else:
        _check_creatable(flag, shown, p)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{flag}: '{shown}': cannot create the directory: {_first_line(err)}") from None
    return p


def check_output_file(flag: str, path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written as a file (atomically, see :func:`atomic_writer`).

    It must not be a directory nor another non-regular file (a device, a socket); its directory
    must exist and accept a new file, or be creatable (its nearest existing ancestor a writable
    directory). The directory is not created here: :func:`atomic_writer` does that. Raises
    ValueError ``"FLAG: 'PATH' ..."`` naming the problem; returns the path as a Path.
    """
    shown = os.fspath(path)
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag}: '{shown}' is a directory; expected a file path")
    if p.exists() and not p.is_file():
        raise ValueError(f"{flag}: '{shown}' exists and is not a regular file")
    parent = p.parent
    if parent.is_dir():
        _probe_writable(flag, shown, parent)
    elif parent.exists() or parent.is_symlink():
        raise ValueError(f"{flag}: '{shown}': cannot be created, '{parent}' is not a directory")
    else:
        _check_creatable(flag, shown, parent)
    return p


def check_input_file(flag: str, path: str | os.PathLike) -> Path:
    """Check that ``path`` is an existing regular file that can be opened for reading.

    Raises ValueError ``"FLAG: 'PATH': no such file"``, ``"... is a directory"`` or ``"...
    cannot be read: REASON"``; returns the path as a Path.
    """
    shown = os.fspath(path)
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag}: '{shown}' is a directory; expected a file")
    if not p.exists():
        raise ValueError(f"{flag}: '{shown}': no such file")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise ValueError(f"{flag}: '{shown}': cannot be read: {_first_line(err)}") from None
    return p


def _new_file_mode() -> int:
    """The mode an ordinary ``open(path, 'w')`` would give a new file: 0o666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A text file handle whose content replaces ``path`` only when the ``with`` block succeeds.

    Writes to a temporary file in ``path``'s directory (created with its parents if missing),
    flushes and fsyncs it, then ``os.replace``-s it onto ``path`` (atomic on POSIX and Windows
    within one file system). If the block raises, the temporary file is removed and ``path``
    keeps its previous content. The new file gets the previous file's permission bits, or the
    usual ones for a new file (0o666 minus the umask) rather than mkstemp's 0o600.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path, encoding=encoding) as f:
        f.write(text)
    return Path(path).expanduser()
