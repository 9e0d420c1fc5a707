"""finegrain.cli.outputs: output/input path checks made before the work, and atomic writes.

Unwritable situations are built so that they hold even for root (a path under a regular file,
an output directory that is a file, a file output that is a directory); the permission-based
case runs only when not root, and a refused probe is also simulated by patching mkstemp.
"""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from finegrain.cli import outputs
from finegrain.cli.outputs import (atomic_write_text, atomic_writer, check_input_file, check_output_dir,
                                   check_output_file)


def leftovers(d):
    """Probe or temporary files left in ``d``."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ check_output_dir


def test_output_dir_existing_or_creatable_passes_and_leaves_no_probe(tmp_path):
    assert check_output_dir("--out", tmp_path) == tmp_path
    assert leftovers(tmp_path) == []
    new = tmp_path / "a" / "b"
    assert check_output_dir("--out", str(new)) == new
    assert not (tmp_path / "a").exists()                          # checked, not created
    check_output_dir("--out", str(new), create=True)
    assert new.is_dir() and leftovers(tmp_path) == []


@pytest.mark.parametrize("make,problem", [
    (lambda t: (t / "file.txt").write_text("x") and t / "file.txt", "exists and is not a directory"),
    (lambda t: (t / "file.txt").write_text("x") and t / "file.txt" / "out", "is not a directory"),
    (lambda t: (t / "file.txt").write_text("x") and t / "file.txt" / "a" / "b", "is not a directory"),
])
def test_output_dir_errors_name_flag_path_and_problem(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ValueError) as e:
        check_output_dir("--out", str(path), create=True)
    msg = str(e.value)
    assert msg.startswith(f"--out: '{path}'") and problem in msg and "\n" not in msg, msg
    assert (tmp_path / "file.txt").read_text() == "x"             # untouched


def test_refused_probe_is_reported(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    where = f"cannot write there ('{tmp_path}'): Permission denied"   # the directory that refused
    for check, path in ((check_output_dir, tmp_path / "new"), (check_output_file, tmp_path / "s.jsonl"),
                        (check_output_dir, tmp_path)):
        with pytest.raises(ValueError) as e:
            check("--out", str(path))
        assert str(e.value) == f"--out: '{path}': " + (where if path != tmp_path else
                                                       "cannot write there: Permission denied")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into a read-only directory; covered by the simulated refusal")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write there"):
            check_output_dir("--out", str(ro / "sub"))
        with pytest.raises(ValueError, match="cannot write there"):
            check_output_file("--out", str(ro / "s.jsonl"))
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- check_output_file


def test_output_file_checks(tmp_path):
    assert check_output_file("--out", str(tmp_path / "s.jsonl")) == tmp_path / "s.jsonl"
    assert check_output_file("--out", str(tmp_path / "x" / "y" / "s.jsonl")) == tmp_path / "x" / "y" / "s.jsonl"
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []
    (tmp_path / "old.jsonl").write_text("old\n")
    check_output_file("--out", str(tmp_path / "old.jsonl"))      # replacing a file is fine
    with pytest.raises(ValueError, match=rf"^--out: '{tmp_path}' is a directory; expected a file path$"):
        check_output_file("--out", str(tmp_path))
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "file.txt" / "s.jsonl", tmp_path / "file.txt" / "a" / "s.jsonl"):
        with pytest.raises(ValueError, match=r"is not a directory$") as e:
            check_output_file("--out", str(bad))
        assert str(e.value).startswith(f"--out: '{bad}'")


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_output_file_refuses_a_device():
    # os.replace onto a device node would replace the node itself
    with pytest.raises(ValueError, match=r"^--out: '/dev/null' exists and is not a regular file$"):
        check_output_file("--out", "/dev/null")


# ------------------------------------------------------------------------------ check_input_file


def test_input_file_checks(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("{}\n")
    assert check_input_file("--data", str(f)) == f
    with pytest.raises(ValueError, match=rf"^--data: '{tmp_path / 'no.jsonl'}': no such file$"):
        check_input_file("--data", str(tmp_path / "no.jsonl"))
    with pytest.raises(ValueError, match=rf"^--data: '{tmp_path}' is a directory; expected a file$"):
        check_input_file("--data", str(tmp_path))


def test_unreadable_input_is_one_line(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text("{}\n")
    real_open = type(f).open

    def refuse(self, *a, **k):
        if self == f:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *a, **k)
    monkeypatch.setattr(type(f), "open", refuse)
    with pytest.raises(ValueError, match=rf"^--data: '{f}': cannot be read: Permission denied$"):
        check_input_file("--data", str(f))


# --------------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_parents_and_keeps_file_mode(tmp_path):
    p = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(p, "one\n")
    assert p.read_text() == "one\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask      # not mkstemp's 0o600
    p.chmod(0o640)
    atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n" and stat.S_IMODE(p.stat().st_mode) == 0o640
    assert leftovers(p.parent) == []


def test_crash_mid_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "scores.jsonl"
    p.write_text("good\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(p) as f:
            f.write("half a li")
            raise RuntimeError("boom")
    assert p.read_text() == "good\n" and leftovers(tmp_path) == []


def test_failed_replace_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "scores.jsonl"
    p.write_text("good\n")

    def fail(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(p, "new\n" * 1000)
    assert p.read_text() == "good\n" and leftovers(tmp_path) == []
