"""Executors: run independent jobs (one galaxy each) and yield outcomes as they finish.

Three strategies implement :class:`sphot_core.stages.Executor`:

``serial``
    Every job in the calling process, one after the other (debugging, tiny batches).
    A per-job ``timeout`` is enforced with ``SIGALRM`` when running in the main thread
    of a POSIX process; a job that kills the process (``os._exit``, segfault) kills the
    batch, because there is no other process to survive it.
``processes`` (the default)
    A pool of local worker processes that this module manages itself, so that one job
    crashing its worker or running past its time limit costs that job only: the worker
    is killed if needed and replaced, and the other jobs carry on.
``dask``
    ``dask.distributed``: a ``LocalCluster`` on the loopback interface by default, or an
    existing scheduler (``scheduler`` option), e.g. one started by dask-jobqueue on
    Slurm/PBS. Optional: needs ``pip install 'sphot[dask]'``.

Every executor takes the number of parallel jobs from its ``jobs`` option (0 = the
number of usable CPU cores); the command line's ``--jobs N`` sets that option. Every
failure becomes a :class:`~sphot_core.stages.JobOutcome` whose ``error`` starts with a
kind: the exception class name (``"InputError: ..."``), :data:`WORKER_CRASHED` or
:data:`TIMED_OUT`, identical for all executors.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (registers its atexit hook before ours)
import os
import queue
import signal
import threading
import time
import traceback
import uuid
import weakref
from collections import deque
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

from sphot_core.errors import ConfigError, PluginError
from sphot_core.hookspecs import StrategySpec
from sphot_core.stages import Executor, JobOutcome

__all__ = [
    "SerialExecutor",
    "SerialOptions",
    "ProcessExecutor",
    "ProcessOptions",
    "DaskExecutor",
    "DaskOptions",
    "WORKER_CRASHED",
    "TIMED_OUT",
    "THREAD_VARIABLES",
    "blas_limit",
    "thread_environment",
    "usable_cpus",
    "SPECS",
]

log = logging.getLogger(__name__)

#: error kind of a job whose worker process died while running it
WORKER_CRASHED = "WorkerCrashed"
#: error kind of a job that ran past its time limit
TIMED_OUT = "TimeoutError"

#: environment variables that cap the threads of BLAS/OpenMP libraries in a worker
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)

#: seconds between checks of a worker that its parent process is still alive
_ORPHAN_POLL = 1.0
#: seconds between checks of a dask cluster's size and of the jobs' time limits
_DASK_POLL = 1.0
#: message of a worker that has received and unpickled a job and starts running it
_STARTED = "sphot-job-started"
#: extra seconds allowed, before a job has started, for a worker's start-up and for
#: unpickling the job (imports); the time limit itself counts from the job's start
_START_ALLOWANCE = 60.0
#: seconds granted to an idle worker to exit after being asked to
_STOP_GRACE = 5.0

_non_negative = attrs.validators.ge(0)
_positive = attrs.validators.ge(1)


# ------------------------------------------------------------------------- helpers


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _workers_for(jobs: int) -> int:
    return jobs if jobs > 0 else usable_cpus()


def thread_environment(n_threads: int) -> Dict[str, str]:
    """The :data:`THREAD_VARIABLES` set to ``n_threads``."""
    return {name: str(n_threads) for name in THREAD_VARIABLES}


def blas_limit(n_threads: int):
    """Context in which BLAS/OpenMP libraries already loaded in this process use at most
    ``n_threads`` threads (threadpoolctl); 0 leaves them as they are."""
    if n_threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n_threads)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _crash_error(detail: str, started: bool = True) -> str:
    when = "while running the job" if started else "before the job started (could it import everything?)"
    return f"{WORKER_CRASHED}: the worker died {when} ({detail})"


def _timeout_error(timeout: float) -> str:
    return f"{TIMED_OUT}: the job exceeded its time limit of {timeout:g} s"


def _exit_description(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    """``None`` or 0 -> no limit; a negative or non-numeric limit is a ConfigError."""
    if timeout is None or timeout == 0:
        return None
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ConfigError(f"executor timeout must be a number of seconds, got {timeout!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"executor timeout must be a positive number of seconds, got {timeout!r}")
    return value


Reply = Tuple[Any, Optional[str], Optional[str], float]


def _call(fn: Callable[[Any], Any], job: Any) -> Reply:
    """Run ``fn(job)``; return ``(result, error, traceback, seconds)``.

    Exceptions of the job (and ``SystemExit``, so that a job calling ``sys.exit`` does
    not end a worker or the batch) become ``error``/``traceback``.
    """
    start = time.perf_counter()
    try:
        result = fn(job)
    except (Exception, SystemExit) as exc:
        return None, _describe(exc), traceback.format_exc(), time.perf_counter() - start
    return result, None, None, time.perf_counter() - start


@contextlib.contextmanager
def _environment(values: Mapping[str, str]):
    """Set environment variables for the duration of the block (child processes inherit)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


# -------------------------------------------------------------------------- serial


@attrs.frozen
class SerialOptions:
    """``[executor.serial]``.

    Attributes
    ----------
    jobs : int
        Accepted for uniformity with the other executors; must be 0 or 1.
    blas_threads : int
        BLAS/OpenMP threads while a job runs (0 = the libraries' own default). 1, as in
        the workers of the other executors, makes every executor give identical
        catalogues: multi-threaded BLAS sums in a different order, and the joint
        brightness solve carries such rounding differences into the last digits.
    """

    jobs: int = attrs.field(default=1, validator=attrs.validators.in_((0, 1)))
    blas_threads: int = attrs.field(default=1, validator=_non_negative)


class _JobTimeout(BaseException):
    """Raised by SIGALRM inside a serial job (a BaseException so ``except Exception``
    in the job's own code does not swallow it)."""


def _raise_timeout(signum, frame):
    raise _JobTimeout()


def _alarm_available() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


class SerialExecutor(Executor):
    """Run the jobs one after the other in the calling process.

    The time limit uses ``SIGALRM`` (POSIX, main thread only; elsewhere jobs run without
    a limit and a warning is logged). It interrupts Python code, not a long call inside
    a C extension, which is interrupted when it returns to Python. A job that ends the
    process (``os._exit``, a segfault) ends the batch: use ``processes`` to isolate them.
    """

    Options = SerialOptions
    name = "serial"

    @property
    def slots(self) -> int:
        """Jobs running at once."""
        return 1

    def run(self, fn, jobs: Sequence[Any], *, timeout: Optional[float] = None) -> Iterator[JobOutcome]:
        timeout = _check_timeout(timeout)
        if timeout is not None and not _alarm_available():
            log.warning("serial executor: cannot enforce the %g s time limit outside the main thread", timeout)
            timeout = None
        for job in jobs:
            with blas_limit(self.options.blas_threads):
                if timeout is None:
                    result, error, tb, seconds = _call(fn, job)
                else:
                    result, error, tb, seconds = self._call_with_alarm(fn, job, timeout)
            yield JobOutcome(job=job, result=result, error=error, traceback=tb, seconds=seconds)

    @staticmethod
    def _call_with_alarm(fn, job, timeout: float) -> Reply:
        start = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        if previous is None:  # a handler installed from C: restore the default
            previous = signal.SIG_DFL
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                return _call(fn, job)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _JobTimeout:
            return None, _timeout_error(timeout), None, time.perf_counter() - start
        finally:
            signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------- processes


@attrs.frozen
class ProcessOptions:
    """``[executor.processes]``.

    Attributes
    ----------
    jobs : int
        Worker processes (galaxies at once); 0 = the number of usable CPU cores.
    start_method : str
        ``"spawn"`` (default: fresh interpreters that honour the thread limits and are
        safe in threaded parents), ``"forkserver"`` or ``"fork"`` (fast, but the thread
        limits then only reach libraries not yet loaded in the parent).
    max_tasks_per_child : int
        Replace a worker after this many jobs (bounds slow memory growth); 0 = never.
    blas_threads : int
        BLAS/OpenMP threads per worker (:data:`THREAD_VARIABLES`).
    """

    jobs: int = attrs.field(default=0, validator=_non_negative)
    start_method: str = attrs.field(default="spawn", validator=attrs.validators.in_(("spawn", "forkserver", "fork")))
    max_tasks_per_child: int = attrs.field(default=0, validator=_non_negative)
    blas_threads: int = attrs.field(default=1, validator=_positive)


def _exit_if_orphaned(parent_pid: int) -> None:
    """Worker watchdog: end the worker soon after its parent died (e.g. was SIGKILLed)."""
    while True:
        time.sleep(_ORPHAN_POLL)
        if os.getppid() != parent_pid:
            os._exit(1)


def _send_reply(conn, reply: Reply) -> None:
    """Send a reply; a result that does not pickle becomes an error reply."""
    try:
        data = ForkingPickler.dumps(reply)
    except Exception as exc:
        note = f"{_describe(exc)} (the job's result could not be sent back)"
        data = ForkingPickler.dumps((None, note, traceback.format_exc(), reply[3]))
    conn.send_bytes(data)


def _worker_main(conn, parent_pid: int) -> None:
    """Body of a worker process: receive ``(fn, job)``, say it started, reply, repeat."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent
    threading.Thread(target=_exit_if_orphaned, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as exc:  # the job (or fn) cannot be unpickled here
            note = f"{_describe(exc)} (the job could not be received)"
            _send_reply(conn, (None, note, traceback.format_exc(), 0.0))
            continue
        if message is None:
            return
        fn, job = message
        try:
            conn.send(_STARTED)
            _send_reply(conn, _call(fn, job))
        except OSError:  # the parent is gone
            return


class _Worker:
    """One worker process, the pipe to it and the job it is running."""

    def __init__(self, context, blas_threads: int):
        parent_end, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_end, os.getpid()), name="sphot-worker")
        with _environment(thread_environment(blas_threads)):
            self.process.start()
        child_end.close()
        self.conn = parent_end
        self.completed = 0
        self.job: Any = None
        self.busy = False
        self.running = False
        self.started = 0.0
        self.deadline = math.inf

    def submit(self, fn, job, timeout: Optional[float]) -> None:
        """Send a job (raises if it cannot be pickled or the worker is gone)."""
        self.conn.send((fn, job))
        self.job, self.busy, self.running = job, True, False
        self.start_clock(timeout, _START_ALLOWANCE)

    def start_clock(self, timeout: Optional[float], allowance: float = 0.0) -> None:
        """Start the job's clock: at submission (with an allowance), again when it starts."""
        self.started = time.monotonic()
        self.deadline = self.started + timeout + allowance if timeout else math.inf

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finish(self, reply: Reply) -> JobOutcome:
        result, error, tb, seconds = reply
        outcome = JobOutcome(job=self.job, result=result, error=error, traceback=tb, seconds=seconds)
        self.job, self.busy, self.running = None, False, False
        self.completed += 1
        return outcome

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit; kill it if it does not."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(_STOP_GRACE)
        self.kill()


_LIVE_POOLS: "weakref.WeakSet[ProcessExecutor]" = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_live_pools() -> None:
    """At interpreter exit: stop workers of executors that were never closed.

    Workers are not daemonic (so a job may start its own processes), so
    multiprocessing's exit handler would otherwise wait for them forever.
    """
    for pool in list(_LIVE_POOLS):
        pool.close()


def _track(pool: "ProcessExecutor") -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        atexit.register(_close_live_pools)  # after multiprocessing's hook, so it runs first
        _ATEXIT_REGISTERED = True
    _LIVE_POOLS.add(pool)


class ProcessExecutor(Executor):
    """A pool of local worker processes that survives crashed and hung jobs.

    Each worker runs one job at a time. The parent waits on every busy worker's pipe
    and process sentinel at once: a reply is an outcome; a worker that dies without
    replying yields a :data:`WORKER_CRASHED` outcome for its job and is replaced; a
    job past its time limit has its worker killed (:data:`TIMED_OUT`) and replaced.
    The time limit counts from the job's start in its worker (a worker reports it
    after unpickling the job), so a new worker's start-up is not charged to the job.
    Workers are started lazily, kept between :meth:`run` calls and stopped by
    :meth:`close`; they exit by themselves within a second if the parent dies.
    ``fn`` and the jobs must pickle; :meth:`run` is not thread-safe.
    """

    Options = ProcessOptions
    name = "processes"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self._context = multiprocessing.get_context(self.options.start_method)
        self._workers: List[_Worker] = []

    @property
    def slots(self) -> int:
        """Jobs running at once (the number of workers)."""
        return _workers_for(self.options.jobs)

    def close(self) -> None:
        for worker in self._workers:
            if worker.busy:
                worker.kill()
            else:
                worker.stop()
        self._workers.clear()
        _LIVE_POOLS.discard(self)

    # ------------------------------------------------------------ pool management
    def _idle_worker(self) -> _Worker:
        for worker in self._workers:
            if not worker.busy and worker.process.is_alive():
                return worker
        for worker in [w for w in self._workers if not w.busy]:
            self._discard(worker)  # died while idle
        worker = _Worker(self._context, self.options.blas_threads)
        self._workers.append(worker)
        _track(self)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)

    def _after_job(self, worker: _Worker) -> None:
        limit = self.options.max_tasks_per_child
        if limit and worker.completed >= limit:
            worker.stop()
            self._workers.remove(worker)

    # ------------------------------------------------------------------ running
    def run(self, fn, jobs: Sequence[Any], *, timeout: Optional[float] = None) -> Iterator[JobOutcome]:
        timeout = _check_timeout(timeout)
        pending: Deque[Any] = deque(jobs)
        busy: List[_Worker] = []
        try:
            while pending or busy:
                while pending and len(busy) < self.slots:
                    job = pending.popleft()
                    worker = self._idle_worker()
                    try:
                        worker.submit(fn, job, timeout)
                    except Exception as exc:  # fn or job does not pickle, or the worker just died
                        if not worker.process.is_alive():
                            self._discard(worker)
                        yield JobOutcome(job=job, error=f"{_describe(exc)} (the job could not be sent to a worker)",
                                         traceback=traceback.format_exc(), seconds=0.0)
                        continue
                    busy.append(worker)
                if busy:
                    yield from self._collect(busy, timeout)
        finally:
            for worker in busy:  # the consumer stopped early: abandon jobs in flight
                self._discard(worker)

    def _collect(self, busy: List[_Worker], timeout: Optional[float]) -> Iterator[JobOutcome]:
        """Wait for the next replies, deaths or expired deadlines among ``busy``."""
        deadline = min(w.deadline for w in busy)
        wait = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        handles = {}
        for worker in busy:
            handles[worker.conn] = worker
            handles[worker.process.sentinel] = worker
        ready = multiprocessing.connection.wait(list(handles), timeout=wait)
        for worker in dict.fromkeys(handles[h] for h in ready):
            reply = self._receive(worker)
            if reply == _STARTED:  # the time limit counts from here
                worker.running = True
                worker.start_clock(timeout)
                continue
            busy.remove(worker)
            yield self._crashed(worker) if reply is None else self._finished(worker, reply)
        now = time.monotonic()
        for worker in [w for w in busy if w.deadline <= now]:
            busy.remove(worker)
            elapsed = worker.elapsed()
            job = worker.job
            self._discard(worker)
            log.warning("job %r exceeded its %g s time limit; its worker was killed", job, timeout)
            yield JobOutcome(job=job, error=_timeout_error(timeout), seconds=elapsed)

    @staticmethod
    def _receive(worker: _Worker) -> Any:
        """The worker's next message, or ``None`` if it died without sending one."""
        try:
            return worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            return None  # the worker died while sending
        except Exception as exc:  # the reply arrived whole but does not unpickle here
            note = f"{_describe(exc)} (the job's result could not be received)"
            return None, note, traceback.format_exc(), worker.elapsed()

    def _finished(self, worker: _Worker, reply: Reply) -> JobOutcome:
        outcome = worker.finish(reply)
        self._after_job(worker)
        return outcome

    def _crashed(self, worker: _Worker) -> JobOutcome:
        job, elapsed = worker.job, worker.elapsed()
        self._discard(worker)
        detail = _exit_description(worker.process.exitcode)
        log.warning("the worker running job %r died (%s); starting a new one", job, detail)
        return JobOutcome(job=job, error=_crash_error(detail, worker.running), seconds=elapsed)


# ---------------------------------------------------------------------------- dask


@attrs.frozen
class DaskOptions:
    """``[executor.dask]``.

    Attributes
    ----------
    scheduler : str
        Address of an existing scheduler (``tcp://host:8786``) or path of its scheduler
        JSON file; ``""`` starts a private ``LocalCluster`` on 127.0.0.1 (no dashboard).
    jobs : int
        Worker processes of the LocalCluster; 0 = the number of usable CPU cores.
        Ignored with ``scheduler`` (the cluster decides).
    threads_per_worker : int
        Threads per LocalCluster worker. Keep 1: a crash or a time-out then costs one
        job only.
    memory_limit : str
        Memory limit per LocalCluster worker (dask syntax: ``"4GiB"``, ``"auto"``).
    allowed_failures : int
        LocalCluster only: how many times a job whose worker died is retried elsewhere
        before it is reported as crashed (dask's ``allowed-failures``). An external
        scheduler uses its own setting.
    blas_threads : int
        BLAS/OpenMP threads per LocalCluster worker.
    """

    scheduler: str = ""
    jobs: int = attrs.field(default=0, validator=_non_negative)
    threads_per_worker: int = attrs.field(default=1, validator=_positive)
    memory_limit: str = "auto"
    allowed_failures: int = attrs.field(default=0, validator=_non_negative)
    blas_threads: int = attrs.field(default=1, validator=_positive)


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise PluginError(
            "the dask executor needs dask.distributed, which is not installed: pip install 'sphot[dask]'"
        ) from None
    return distributed


def _dask_call(fn: Callable[[Any], Any], job: Any, topic: Optional[str]) -> Reply:
    """Worker side of the dask executor: announce the job's start (for its time limit), run it."""
    if topic is not None:
        from distributed import get_worker

        worker = get_worker()
        worker.log_event(topic, worker.get_current_task())
    return _call(fn, job)


@attrs.define
class _InFlight:
    job: Any
    future: Any
    started: float
    deadline: float


class _DaskRun:
    """The bookkeeping of one :meth:`DaskExecutor.run`: jobs in flight and their clocks.

    Futures report completion through a callback into ``finished``; jobs report their
    start through a dask event topic into ``started`` (only with a time limit). Before
    its start event, a job's deadline includes :data:`_START_ALLOWANCE`.
    """

    def __init__(self, client, timeout: Optional[float]):
        self.client = client
        self.timeout = timeout
        self.flying: Dict[str, _InFlight] = {}
        self.finished: "queue.Queue[Any]" = queue.Queue()
        self.started: "queue.Queue[Tuple[str, float]]" = queue.Queue()
        self.topic = f"sphot-job-started-{uuid.uuid4().hex}" if timeout else None
        if self.topic:
            client.subscribe_topic(self.topic, lambda event: self.started.put((event[1], time.monotonic())))

    def _deadline(self, since: float, allowance: float = 0.0) -> float:
        return since + self.timeout + allowance if self.timeout else math.inf

    def submit(self, fn, job) -> None:
        key = f"sphot-job-{uuid.uuid4().hex}"
        future = self.client.submit(_dask_call, fn, job, self.topic, pure=False, key=key)
        now = time.monotonic()
        self.flying[key] = _InFlight(job, future, now, self._deadline(now, _START_ALLOWANCE))
        future.add_done_callback(self.finished.put)

    def next_finished(self) -> Optional[_InFlight]:
        """Wait (at most until the next deadline or poll) for a finished job."""
        self._note_starts()
        deadline = min(r.deadline for r in self.flying.values())
        wait = min(_DASK_POLL, max(0.0, deadline - time.monotonic()))
        try:
            future = self.finished.get(timeout=wait)
        except queue.Empty:
            return None
        return self.flying.pop(future.key, None)

    def _note_starts(self) -> None:
        while True:
            try:
                key, when = self.started.get_nowait()
            except queue.Empty:
                return
            record = self.flying.get(key)
            if record is not None:
                record.started, record.deadline = when, self._deadline(when)

    def expired(self) -> List[_InFlight]:
        self._note_starts()
        now = time.monotonic()
        return [self.flying.pop(k) for k, r in list(self.flying.items()) if r.deadline <= now]

    def close(self) -> None:
        for record in self.flying.values():  # the consumer stopped early
            record.future.cancel()
        if self.topic:
            self.client.unsubscribe_topic(self.topic)


class DaskExecutor(Executor):
    """Run jobs on a ``dask.distributed`` cluster.

    The executor keeps at most as many jobs submitted as the cluster has worker
    threads (re-read as workers join or leave), so every submitted job starts at once
    and a worker that dies takes no queued job with it. Each job announces its start
    through a dask event, and its time limit counts from there. A job past its time
    limit is cancelled and its worker restarted through its nanny. A job whose worker
    died comes back from dask as ``KilledWorker`` and is reported as
    :data:`WORKER_CRASHED`.
    """

    Options = DaskOptions
    name = "dask"

    def __init__(self, options: Any = None):
        super().__init__(options)
        _import_distributed()
        self._client = None
        self._cluster = None
        self._slots = 0

    @property
    def slots(self) -> int:
        """Worker threads seen at the last check (the LocalCluster's size before start)."""
        if self._slots:
            return self._slots
        return 0 if self.options.scheduler else _workers_for(self.options.jobs) * self.options.threads_per_worker

    @property
    def client(self):
        """The ``distributed.Client`` (connecting or starting the LocalCluster on first use)."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self):
        distributed = _import_distributed()
        target = self.options.scheduler
        if target:
            if self.options.jobs:
                log.info("dask executor: jobs=%d ignored, the cluster at %s decides", self.options.jobs, target)
            try:
                if os.path.isfile(target):
                    return distributed.Client(scheduler_file=target, set_as_default=False)
                return distributed.Client(target, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConfigError(f"cannot connect to the dask scheduler {target!r}: {_describe(exc)}") from None
        self._cluster = self._local_cluster(distributed)
        return distributed.Client(self._cluster, set_as_default=False)

    def _local_cluster(self, distributed):
        import dask

        opts = self.options
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
        environ.update(thread_environment(opts.blas_threads))
        settings = {
            "distributed.scheduler.allowed-failures": opts.allowed_failures,
            "distributed.nanny.pre-spawn-environ": environ,
        }
        with dask.config.set(settings):
            return distributed.LocalCluster(
                n_workers=_workers_for(opts.jobs),
                threads_per_worker=opts.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=opts.memory_limit,
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        self._slots = 0

    # ------------------------------------------------------------------ running
    def _refresh_slots(self) -> int:
        self._slots = sum(self.client.nthreads().values())
        return self._slots

    def run(self, fn, jobs: Sequence[Any], *, timeout: Optional[float] = None) -> Iterator[JobOutcome]:
        batch = _DaskRun(self.client, _check_timeout(timeout))
        pending: Deque[Any] = deque(jobs)
        try:
            while pending or batch.flying:
                free = self._refresh_slots() - len(batch.flying)
                while pending and free > 0:
                    batch.submit(fn, pending.popleft())
                    free -= 1
                if not batch.flying:
                    log.info("dask executor: waiting for workers to join the cluster")
                    with contextlib.suppress(TimeoutError):
                        self.client.wait_for_workers(1, timeout=10 * _DASK_POLL)
                    continue
                record = batch.next_finished()
                if record is not None:
                    yield self._outcome(record)
                for record in batch.expired():
                    elapsed = time.monotonic() - record.started
                    self._abandon(record)
                    yield JobOutcome(job=record.job, error=_timeout_error(batch.timeout), seconds=elapsed)
        finally:
            batch.close()

    def _outcome(self, record: _InFlight) -> JobOutcome:
        try:
            return self._read_outcome(record)
        finally:
            record.future.release()  # else dask may recompute it if its worker dies later

    @staticmethod
    def _read_outcome(record: _InFlight) -> JobOutcome:
        future = record.future
        elapsed = time.monotonic() - record.started
        if future.status == "finished":
            result, error, tb, seconds = future.result()
            return JobOutcome(job=record.job, result=result, error=error, traceback=tb, seconds=seconds)
        if future.status == "cancelled":
            error = "CancelledError: the dask cluster cancelled the job"
            return JobOutcome(job=record.job, error=error, seconds=elapsed)
        exc = future.exception()
        if type(exc).__name__ == "KilledWorker":
            last = getattr(getattr(exc, "last_worker", None), "address", "?")
            detail = f"dask KilledWorker: {getattr(exc, 'allowed_failures', 0) + 1} worker(s) died, the last {last}"
            log.warning("the dask worker running job %r died", record.job)
            return JobOutcome(job=record.job, error=_crash_error(detail), seconds=elapsed)
        tb = "".join(traceback.format_tb(future.traceback())) if future.traceback() else None
        return JobOutcome(job=record.job, error=_describe(exc), traceback=tb, seconds=elapsed)

    def _abandon(self, record: _InFlight) -> None:
        """Cancel a job past its time limit and restart the worker still running it."""
        key = record.future.key
        workers = [w for w, keys in self.client.processing().items() if key in keys]
        record.future.cancel()
        log.warning("job %r exceeded its time limit; restarting dask worker(s) %s",
                    record.job, ", ".join(workers) or "-")
        if workers:
            status = self.client.restart_workers(workers, raise_for_error=False)
            for worker, state in status.items():
                if state != "OK":
                    log.warning("could not restart dask worker %s (%s); the abandoned job may still run",
                                worker, state)


SPECS = [
    StrategySpec(
        name="serial",
        factory=SerialExecutor,
        options=SerialOptions,
        description="one job after the other in this process (debugging, tiny batches)",
    ),
    StrategySpec(
        name="processes",
        factory=ProcessExecutor,
        options=ProcessOptions,
        aliases=("local", "multiprocessing"),
        description="local worker processes; crashed or hung jobs are isolated (default)",
    ),
    StrategySpec(
        name="dask",
        factory=DaskExecutor,
        options=DaskOptions,
        aliases=("distributed",),
        description="dask.distributed: a LocalCluster or an existing scheduler (needs sphot[dask])",
    ),
]
