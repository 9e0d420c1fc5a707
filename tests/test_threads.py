"""finegrain.threads: explicit settings win, otherwise free CPUs (affinity, quota, load) -> threads."""

import os

import pytest

from finegrain import threads


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: set("cpus", n), set("load", x), set("quota", q); no real env consulted."""
    state = {"cpus": 2, "load": 0.0, "quota": None, "busy": None}  # busy None: /proc/stat unavailable
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(state["cpus"])), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (state["load"], 9.0, 9.0), raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: state["quota"])
    monkeypatch.setattr(threads, "busy_cpus", lambda window=0.3: state["busy"])
    return state


@pytest.mark.parametrize("cpus,load,want", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (1, 0.0, 1), (8, 0.0, 8), (8, 3.0, 5), (8, 2.6, 5), (8, 2.4, 6), (8, 20.0, 1), (4, -1.0, 4),
])
def test_auto_maps_free_cpus_to_threads(machine, cpus, load, want):
    machine.update(cpus=cpus, load=load)
    assert threads.choose_threads(None, environ={}) == want
    assert threads.choose_threads(0, environ={}) == want


@pytest.mark.parametrize("load,busy,want", [
    (2.0, 0.1, 2),   # the previous run just ended: the load average still counts it, the CPUs are free
    (0.1, 2.0, 2),   # a burst (or a job started seconds ago) the load average has not seen
    (1.0, 1.0, 1), (2.0, 1.2, 1), (1.3, 5.0, 1), (0.4, 0.3, 2),
])
def test_both_load_and_busy_cpus_must_say_busy(machine, load, busy, want):
    machine.update(cpus=2, load=load, busy=busy)
    assert threads.others_load() == min(load, busy)
    assert threads.choose_threads(None, environ={}) == want


def test_busy_cpus_reads_proc_stat(monkeypatch):
    lines = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  250 0 150 900 100 0 0 0 0 0\n"])
    real_open = open

    class F:
        def __init__(self, text): self.text = text
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def readline(self): return self.text

    monkeypatch.setattr("builtins.open", lambda path, *a, **k: F(next(lines)) if path == "/proc/stat" else real_open(path, *a, **k))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    # busy 200 -> 400 (+200) of total 1000 -> 1400 (+400): half the time of 4 CPUs
    assert threads.busy_cpus() == pytest.approx(2.0)


def test_busy_cpus_unavailable(monkeypatch):
    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.busy_cpus() is None


def test_one_minute_load_is_the_one_used(machine):
    machine.update(cpus=4, load=0.0)
    assert threads.choose_threads(None, environ={}) == 4  # the 5- and 15-minute averages (9.0) are ignored


def test_cgroup_quota_caps_affinity(machine):
    machine.update(cpus=8, quota=2.5)
    assert threads.available_cpus() == 3
    assert threads.choose_threads(None, environ={}) == 3
    machine.update(quota=0.2)
    assert threads.available_cpus() == 1
    machine.update(quota=None)
    assert threads.available_cpus() == 8


def test_never_below_one(machine):
    machine.update(cpus=1, load=100.0)
    assert threads.choose_threads(None, environ={}) == 1
    assert threads.auto_threads(1, 50.0) == 1
    assert threads.auto_threads(3, 2.9) == 1


def test_explicit_request_wins_over_everything(machine):
    machine.update(cpus=2, load=5.0)
    env = {"OMP_NUM_THREADS": "2", threads.ENV: "torch"}
    assert threads.choose_threads(2, environ=env) == 2
    assert threads.choose_threads(7, environ={}) == 7  # not capped: the user asked


def test_omp_num_threads_left_to_torch(machine):
    machine.update(cpus=2, load=5.0)
    assert threads.choose_threads(None, environ={"OMP_NUM_THREADS": "2"}) is None
    assert threads.choose_threads(None, environ={"OMP_NUM_THREADS": " "}) == 1  # blank is unset


def test_finegrain_threads_env(machine):
    machine.update(cpus=2, load=5.0)
    assert threads.choose_threads(None, environ={threads.ENV: "torch"}) is None
    assert threads.choose_threads(None, environ={threads.ENV: "2", "OMP_NUM_THREADS": "1"}) == 2
    assert threads.choose_threads(None, environ={threads.ENV: "auto", "OMP_NUM_THREADS": "2"}) is None
    assert threads.choose_threads(None, environ={threads.ENV: "AUTO"}) == 1
    assert threads.choose_threads(None, environ={threads.ENV: "0"}) == 1  # 0 = not chosen: auto
    assert threads.choose_threads(3, environ={threads.ENV: "torch"}) == 3


@pytest.mark.parametrize("bad", ["two", "-1", "1.5"])
def test_bad_finegrain_threads_env_is_an_error(machine, bad):
    with pytest.raises(ValueError, match=threads.ENV):
        threads.choose_threads(None, environ={threads.ENV: bad})


def test_negative_request_is_an_error(machine):
    with pytest.raises(ValueError, match="--threads"):
        threads.choose_threads(-1, environ={})


def test_configure_sets_torch_threads(machine, monkeypatch):
    import torch

    calls = []
    current = {"n": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: current["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), current.update(n=n)))
    machine.update(cpus=2, load=1.2, busy=1.5)
    assert threads.configure_threads(None, environ={}) == 1
    assert calls == [1]
    assert threads.configure_threads(None, environ={threads.ENV: "torch"}) == 1  # untouched
    assert calls == [1]
    assert threads.configure_threads(2, environ={}) == 2
    assert calls == [1, 2]


def test_reads_process_environment_by_default(machine, monkeypatch):
    machine.update(cpus=2, load=0.0)
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.choose_threads(None) is None
    monkeypatch.delenv(threads.ENV)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(None) == 2


def test_cgroup_quota_reader(monkeypatch, tmp_path):
    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}
    real_open = open

    def fake_open(path, *a, **k):
        if str(path).startswith("/sys/fs/cgroup"):
            if path not in files:
                raise FileNotFoundError(path)
            p = tmp_path / "f"
            p.write_text(files[path])
            return real_open(p, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert threads._cgroup_quota() == 1.5
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert threads._cgroup_quota() is None
    files.clear()
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert threads._cgroup_quota() is None
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "300000\n"
    assert threads._cgroup_quota() == 3.0
    files.clear()
    assert threads._cgroup_quota() is None


def test_prepare_openmp_sets_passive_before_torch(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "torch")  # as in the CLI before a command imports torch
    env = {}
    assert threads.prepare_openmp(env) is True
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "0"},
                 {threads.ENV: "torch"}, {threads.ENV: " Torch "}):
        env = dict(user)
        assert threads.prepare_openmp(env) is False
        assert env == user  # the user's choice, untouched
    env = {threads.ENV: "2", "OMP_NUM_THREADS": "2"}
    assert threads.prepare_openmp(env) is True and env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_prepare_openmp_is_a_no_op_once_torch_is_imported():
    import sys

    import torch  # noqa: F401

    assert "torch" in sys.modules
    env = {}
    assert threads.prepare_openmp(env) is False
    assert env == {}
