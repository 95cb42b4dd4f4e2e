"""Executors: the same toy jobs (ok, raising, crashing, hanging) give the same outcomes."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from conftest import pid_gone
from sphot_core.errors import ConfigError, InputError, PluginError
from sphot_core.registry import get_registry
from sphot_plugins import executors
from sphot_plugins.executors import THREAD_VARIABLES, TIMED_OUT, WORKER_CRASHED

TIMEOUT = 1.5


def toy_job(spec):
    """A toy job: ``(kind, value)``; picklable by reference (top level of this module)."""
    kind, value = spec
    if kind == "square":
        time.sleep(0.05)
        return value * value
    if kind == "raise":
        raise InputError(f"bad galaxy {value}", galaxy=str(value))
    if kind == "exit":
        sys.exit(value)
    if kind == "crash":
        os._exit(3)
    if kind == "hang":  # value: a file that receives the pid, so the test can check the kill
        with open(value, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(60)
    if kind == "pid":
        time.sleep(0.05)
        return os.getpid()
    if kind == "env":
        return {name: os.environ.get(name) for name in THREAD_VARIABLES}
    if kind == "unpicklable_result":
        return lambda: value
    raise ValueError(f"unknown toy job {kind!r}")


def _jobs(tmp_path, crash=True):
    hang = ("hang", str(tmp_path / "hang.pid"))
    jobs = [("square", 2), ("raise", 3), hang, ("square", 6), ("exit", 7), ("square", 8)]
    if crash:
        jobs.insert(2, ("crash", 4))
    return jobs


def _expected(tmp_path, crash=True):
    expected = {
        ("square", 2): (4, None),
        ("raise", 3): (None, "InputError"),
        ("hang", str(tmp_path / "hang.pid")): (None, TIMED_OUT),
        ("square", 6): (36, None),
        ("exit", 7): (None, "SystemExit"),
        ("square", 8): (64, None),
    }
    if crash:
        expected[("crash", 4)] = (None, WORKER_CRASHED)
    return expected


def summarise(outcomes):
    """job -> (result, error kind); every job must appear exactly once."""
    summary = {}
    for outcome in outcomes:
        assert outcome.job not in summary
        kind = None if outcome.ok else outcome.error.split(":")[0]
        summary[outcome.job] = (outcome.result, kind)
    return summary


def _check_details(outcomes, tmp_path):
    by_job = {o.job: o for o in outcomes}
    raised = by_job[("raise", 3)]
    assert raised.error == "InputError: bad galaxy 3"
    assert "InputError" in raised.traceback and "toy_job" in raised.traceback
    hang = by_job[("hang", str(tmp_path / "hang.pid"))]
    assert TIMEOUT <= hang.seconds < TIMEOUT + 2.0
    assert by_job[("square", 8)].seconds < TIMEOUT


# --------------------------------------------------------------------- registry


def test_registered_with_options():
    registry = get_registry()
    assert {"serial", "processes", "dask"} <= set(registry.names("executor"))
    ex = registry.create("executor", "processes", {"jobs": 3, "max_tasks_per_child": 2})
    assert isinstance(ex, executors.ProcessExecutor) and ex.slots == 3
    assert registry.create("executor", "processes").slots == executors.usable_cpus()
    with pytest.raises(ConfigError, match="jobs"):
        registry.create("executor", "serial", {"jobs": 4})
    with pytest.raises(ConfigError, match="start_method"):
        registry.create("executor", "processes", {"start_method": "thread"})
    with pytest.raises(ConfigError, match="unknown option"):
        registry.create("executor", "processes", {"workers": 2})


def test_bad_timeout_is_config_error():
    with pytest.raises(ConfigError, match="timeout"):
        list(executors.SerialExecutor().run(toy_job, [("square", 1)], timeout=-1))


# ----------------------------------------------------------------------- serial


def test_serial_runs_everything_but_crashes(tmp_path):
    with executors.SerialExecutor() as ex:
        outcomes = list(ex.run(toy_job, _jobs(tmp_path, crash=False), timeout=TIMEOUT))
    assert summarise(outcomes) == _expected(tmp_path, crash=False)
    assert [o.job for o in outcomes] == _jobs(tmp_path, crash=False)  # serial keeps the order
    _check_details(outcomes, tmp_path)


def _blas_threads(_job):
    from threadpoolctl import threadpool_info

    return sorted({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})


def test_serial_runs_jobs_with_the_workers_blas_threads():
    """Jobs of the serial executor see BLAS limited like a worker's (default 1 thread),
    so that every executor gives the same catalogues; 0 leaves the library default."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        outside = _blas_threads(None)
        (inside,) = [o.result for o in executors.SerialExecutor().run(_blas_threads, [0])]
        (untouched,) = [o.result for o in executors.SerialExecutor(executors.SerialOptions(blas_threads=0)).run(_blas_threads, [0])]
        assert _blas_threads(None) == outside  # restored after the job
    assert inside == [1]
    assert untouched == outside


def test_serial_without_main_thread_runs_without_limit(tmp_path, caplog):
    box = {}

    def work():
        box["out"] = list(executors.SerialExecutor().run(toy_job, [("square", 5)], timeout=0.01))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert summarise(box["out"]) == {("square", 5): (25, None)}
    assert "cannot enforce" in caplog.text


# -------------------------------------------------------------------- processes


def test_processes_isolate_crash_and_timeout(tmp_path, monkeypatch):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    jobs = _jobs(tmp_path)
    with get_registry().create("executor", "processes", {"jobs": 2}) as ex:
        outcomes = list(ex.run(toy_job, jobs, timeout=TIMEOUT))
        assert summarise(outcomes) == _expected(tmp_path)
        _check_details(outcomes, tmp_path)
        assert pid_gone(int((tmp_path / "hang.pid").read_text()))  # the hung worker was killed
        # crashed and killed workers were replaced: the same executor keeps working
        again = list(ex.run(toy_job, [("env", 0), ("square", 9), ("pid", 0), ("pid", 1)]))
    results = {o.job: o.result for o in again}
    assert all(o.ok for o in again)
    assert results[("env", 0)] == {name: "1" for name in THREAD_VARIABLES}  # BLAS pinned in workers
    assert all(name not in os.environ for name in THREAD_VARIABLES)  # ... not in the parent
    assert results[("square", 9)] == 81
    assert os.getpid() not in {results[("pid", 0)], results[("pid", 1)]}
    assert ex._workers == []  # close() stopped every worker


def test_processes_pickling_failures_cost_one_job():
    jobs = [("square", 3), ("unpicklable_result", 1), ("square", lambda: 0), ("square", 4)]
    with executors.ProcessExecutor(executors.ProcessOptions(jobs=1)) as ex:
        outcomes = {jobs.index(o.job): o for o in ex.run(toy_job, jobs)}
    assert outcomes[0].result == 9 and outcomes[3].result == 16
    assert "could not be sent back" in outcomes[1].error
    assert "could not be sent to a worker" in outcomes[2].error


def test_processes_recycle_workers(tmp_path):
    options = executors.ProcessOptions(jobs=1, max_tasks_per_child=1)
    with executors.ProcessExecutor(options) as ex:
        pids = [o.result for o in ex.run(toy_job, [("pid", i) for i in range(2)])]
    assert len(set(pids)) == 2  # a fresh worker for every job


def test_processes_early_stop_kills_jobs_in_flight(tmp_path):
    pid_file = tmp_path / "hang.pid"
    with executors.ProcessExecutor(executors.ProcessOptions(jobs=2)) as ex:
        outcomes = ex.run(toy_job, [("square", 1), ("hang", str(pid_file))])
        first = next(outcomes)
        assert first.result == 1
        end = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < end:
            time.sleep(0.05)
        outcomes.close()  # e.g. Ctrl-C in the batch loop
        assert pid_gone(int(pid_file.read_text()))


# ------------------------------------------------------------------------- dask


def test_dask_missing_is_a_plugin_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    with pytest.raises(PluginError, match=r"sphot\[dask\]"):
        get_registry().create("executor", "dask")


@pytest.fixture(scope="module")
def dask_executor():
    """The dask executor with its own LocalCluster (2 workers on 127.0.0.1)."""
    pytest.importorskip("distributed")
    with get_registry().create("executor", "dask", {"jobs": 2}) as ex:
        yield ex


def test_dask_same_outcomes_as_processes(dask_executor, tmp_path):
    outcomes = list(dask_executor.run(toy_job, _jobs(tmp_path), timeout=TIMEOUT))
    assert summarise(outcomes) == _expected(tmp_path)
    _check_details(outcomes, tmp_path)
    assert pid_gone(int((tmp_path / "hang.pid").read_text()))  # its worker was restarted
    assert dask_executor.client.scheduler.address.startswith("tcp://127.0.0.1:")
    # the cluster is whole again and BLAS is pinned in its workers
    again = list(dask_executor.run(toy_job, [("env", 0), ("square", 5)]))
    assert [o.error for o in again] == [None, None]
    assert again[[o.job for o in again].index(("env", 0))].result == {name: "1" for name in THREAD_VARIABLES}
    assert dask_executor.slots == 2


def test_dask_unreachable_scheduler_is_config_error():
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    with dask.config.set({"distributed.comm.timeouts.connect": "0.5s"}):
        ex = get_registry().create("executor", "dask", {"scheduler": "tcp://127.0.0.1:9"})
        with pytest.raises(ConfigError, match="cannot connect"):
            list(ex.run(toy_job, [("square", 1)]))
