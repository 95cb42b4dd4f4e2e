"""Many galaxies: run one processing function per galaxy file on an executor.

The batch driver knows nothing about fitting: it takes a picklable top-level
``process_one(path, out_dir) -> dict`` (the engine's per-galaxy entry point) and an
:class:`~sphot_core.stages.Executor`, and adds what surveys need around them:

* **one writer per file**: workers write only their own galaxy's outputs; only this
  (parent) process writes the batch report, rewritten atomically after every finished
  galaxy, so a killed batch loses at most the galaxies in flight;
* **fault isolation**: a galaxy that raises, crashes its worker or runs past the time
  limit becomes a ``failed`` row with its error and a log file, never a crashed batch;
* **resume** (skip galaxies already ``ok``) and **retry** of failed ones on request;
* **sharding** for job arrays, a **progress** line, and :func:`merge_catalogs` to build
  one survey catalogue from many output folders.

The batch report (``batch_report.csv``, or ``batch_report.shard-I-of-N.csv`` for a
shard) has one row per galaxy, sorted by name, with the columns
:data:`REPORT_COLUMNS` followed by the keys of the summaries ``process_one`` returned
(sorted). ``status`` is ``ok`` (outputs written), ``failed`` (see ``error`` and the
``log`` file) or ``pending`` (queued or in flight when the batch stopped).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import attrs

from .errors import ConfigError, InputError, OutputError
from .io import atomic_path, ensure_output_dir, write_csv

__all__ = [
    "run_batch",
    "read_list",
    "parse_shard",
    "shard_of",
    "select_shard",
    "report_name",
    "merge_catalogs",
    "GalaxyJob",
    "BatchState",
    "BatchResult",
    "MergeResult",
    "ProgressReporter",
    "REPORT_COLUMNS",
    "LOG_DIR",
]

log = logging.getLogger(__name__)

#: leading columns of the batch report
REPORT_COLUMNS = ("galaxy", "path", "status", "error", "seconds", "attempts", "finished_at", "log")
#: folder (inside the output folder) holding one error log per failed galaxy
LOG_DIR = "batch_logs"
OK, FAILED, PENDING = "ok", "failed", "pending"

ProcessOne = Callable[[str, str], Optional[Mapping[str, Any]]]
IsDone = Callable[[str, str], bool]
Shard = Union[str, Tuple[int, int]]


# --------------------------------------------------------------------- inputs


def read_list(path) -> List[Path]:
    """Galaxy paths listed in a text file (``--from-list``).

    One path per line; blank lines and ``#`` comments (whole lines, or after a blank)
    are ignored; ``~`` is expanded; relative paths are relative to the list file's
    folder.
    """
    list_path = Path(path)
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the galaxy list {list_path}: {getattr(exc, 'strerror', None) or exc}",
                         path=str(list_path)) from None
    base = list_path.parent
    paths = []
    for line in text.splitlines():
        entry = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if entry:
            p = Path(entry).expanduser()
            paths.append(p if p.is_absolute() else base / p)
    return paths


def _galaxy_paths(inputs: Iterable[Any]) -> Dict[str, Path]:
    """Galaxy name (file stem) -> absolute path; names must be unique."""
    galaxies: Dict[str, Path] = {}
    for item in inputs:
        path = Path(item).expanduser().absolute()
        name = path.stem
        other = galaxies.get(name)
        if other is not None and other != path:
            raise InputError(f"two input files share the galaxy name {name!r}: {other} and {path}; rename one",
                             galaxy=name)
        galaxies[name] = path
    if not galaxies:
        raise InputError("no galaxy files given")
    return galaxies


# -------------------------------------------------------------------- sharding


def parse_shard(text: str) -> Tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (the ``--shard`` syntax)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise ConfigError(f"--shard must look like I/N with whole numbers, e.g. 0/10; got {text!r}")
    return _checked_shard(int(match.group(1)), int(match.group(2)))


def _checked_shard(index: int, count: int) -> Tuple[int, int]:
    if count < 1:
        raise ConfigError(f"--shard {index}/{count}: the number of shards must be at least 1")
    if not 0 <= index < count:
        raise ConfigError(f"--shard {index}/{count}: the shard index must be 0..{count - 1} (0-based)")
    return index, count


def _as_shard(shard: Optional[Shard]) -> Optional[Tuple[int, int]]:
    if shard is None:
        return None
    if isinstance(shard, str):
        return parse_shard(shard)
    index, count = shard
    return _checked_shard(int(index), int(count))


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) of a galaxy: SHA-256 of its name (the file stem), mod count.

    Depends on nothing but the name, so it is the same on every machine, for every
    ordering of the inputs, and when galaxies are added to or removed from the list.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(names: Iterable[str], shard: Shard) -> List[str]:
    """The names belonging to ``shard`` (``(I, N)`` or ``"I/N"``), in input order."""
    index, count = _as_shard(shard)
    return [name for name in names if shard_of(name, count) == index]


def report_name(shard: Optional[Shard] = None) -> str:
    """File name of the batch report: one per shard, so shards may share a folder."""
    parsed = _as_shard(shard)
    if parsed is None:
        return "batch_report.csv"
    return f"batch_report.shard-{parsed[0]}-of-{parsed[1]}.csv"


# ---------------------------------------------------------------------- report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


class _Report:
    """The rows of a batch report (galaxy -> dict) and their atomic rewrite."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: Dict[str, Dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or not {"galaxy", "status"} <= set(reader.fieldnames):
                    raise OutputError(f"{self.path} is not a sphot batch report (no galaxy/status columns)",
                                      path=str(self.path))
                for row in reader:
                    if row.get("galaxy"):
                        self.rows[row["galaxy"]] = dict(row)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise OutputError(f"cannot read the batch report {self.path}: {exc}", path=str(self.path)) from None

    def status(self, name: str) -> Optional[str]:
        row = self.rows.get(name)
        return row.get("status") if row else None

    def attempts(self, name: str) -> int:
        try:
            return int(self.rows.get(name, {}).get("attempts") or 0)
        except ValueError:
            return 0

    def update(self, name: str, **fields: Any) -> None:
        self.rows.setdefault(name, {"galaxy": name}).update(fields)

    def queue(self, name: str, path: Path) -> None:
        """Mark a galaxy ``pending``, dropping the results of earlier attempts."""
        self.rows[name] = {"galaxy": name, "path": str(path), "status": PENDING, "attempts": self.attempts(name)}

    def write(self) -> None:
        extra = sorted({key for row in self.rows.values() for key in row} - set(REPORT_COLUMNS))
        rows = [self.rows[name] for name in sorted(self.rows)]
        write_csv(self.path, REPORT_COLUMNS + tuple(extra), rows)


@contextlib.contextmanager
def _exclusive(report: Path):
    """Hold an exclusive lock for ``report``: one batch (one writer) per report file.

    Uses ``flock`` on a hidden lock file; the kernel drops the lock when the process
    dies, so a killed batch never blocks its resumption. Without ``fcntl`` (Windows)
    or on file systems that refuse locks, the batch runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(report.with_name(f".{report.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{report} is being written by another running sphot batch; "
                              "wait for it, or use another --out folder or --shard", path=str(report)) from None
        except OSError as exc:
            log.debug("cannot lock %s (%s); running without a lock", report, exc)
        yield
    finally:
        os.close(fd)


def _write_error_log(out_dir: Path, name: str, path: Path, outcome) -> str:
    """Write ``batch_logs/NAME.log`` (error and traceback); return its relative path."""
    relative = f"{LOG_DIR}/{name}.log"
    target = out_dir / relative
    target.parent.mkdir(exist_ok=True)
    text = (
        f"galaxy: {name}\npath: {path}\nfinished_at: {_now()}\nseconds: {outcome.seconds:.3f}\n"
        f"error: {outcome.error}\n\n{outcome.traceback or ''}"
    )
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return relative


def _remove_error_log(out_dir: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (out_dir / LOG_DIR / f"{name}.log").unlink()


# -------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    if not seconds == seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@attrs.frozen
class BatchState:
    """Where a batch stands (passed to the ``progress`` callback).

    Attributes
    ----------
    total : int
        Galaxies in this batch (after sharding).
    to_run : int
        Galaxies submitted in this run (the others are ``skipped``).
    ok, failed : int
        Galaxies of this run finished so far, by result.
    skipped : int
        Galaxies not run: finished before (resume), or failed before and not retried.
    running : int
        Galaxies being processed now (estimated from the executor's ``slots``).
    elapsed : float
        Seconds since the batch started.
    last : str or None
        Name of the galaxy that just finished.
    final : bool
        True for the last call, when the batch is over (or stopped).
    """

    total: int
    to_run: int
    ok: int
    failed: int
    skipped: int
    running: int
    elapsed: float
    last: Optional[str] = None
    final: bool = False

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    @property
    def rate(self) -> float:
        """Galaxies finished per minute in this run (NaN before the first)."""
        return 60.0 * self.finished / self.elapsed if self.finished and self.elapsed > 0 else float("nan")

    @property
    def eta(self) -> float:
        """Seconds until the run is over at the current rate (NaN before the first galaxy)."""
        if not self.finished:
            return float("nan")
        return (self.to_run - self.finished) * self.elapsed / self.finished

    def line(self) -> str:
        """One line: done / failed / running, rate and ETA."""
        rate = f"{self.rate:.1f}/min" if self.finished else "-/min"
        eta = "done" if self.final else f"ETA {_duration(self.eta)}"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"galaxies {self.finished}/{self.to_run}: {self.ok} ok, {self.failed} failed, "
            f"{self.running} running{skipped} | {rate} | {_duration(self.elapsed)} elapsed, {eta}"
        )


class ProgressReporter:
    """Default ``progress`` callback: one overall line.

    On a terminal the line is rewritten in place on ``stream`` (default ``sys.stderr``);
    otherwise (a log file, a batch system's output) each update is logged as a plain
    line at INFO level through this module's logger.
    """

    def __init__(self, stream=None):
        from .progress import interactive

        self.stream = sys.stderr if stream is None else stream
        self.tty = interactive(self.stream)

    def __call__(self, state: BatchState) -> None:
        if not self.tty:
            log.info("%s", state.line())
            return
        self.stream.write("\r" + state.line() + "\x1b[K" + ("\n" if state.final else ""))
        self.stream.flush()


# ------------------------------------------------------------------------ batch


@attrs.frozen
class GalaxyJob:
    """One galaxy to process (what an executor's worker receives)."""

    name: str
    path: str
    out_dir: str


def _run_galaxy(process_one: ProcessOne, job: GalaxyJob) -> Dict[str, Any]:
    """Worker side: ``process_one(path, out_dir)``, its summary checked to be a mapping."""
    summary = process_one(job.path, job.out_dir)
    if summary is None:
        return {}
    if not isinstance(summary, Mapping):
        raise TypeError(f"process_one returned {type(summary).__name__} for {job.path}, not a dict")
    return dict(summary)


@attrs.frozen
class BatchResult:
    """What :func:`run_batch` did.

    Attributes
    ----------
    report : Path
        The batch report file.
    ok, failed : tuple of str
        Galaxies that finished in this run, by result.
    skipped_done : tuple of str
        Galaxies skipped because they were ``ok`` before (resume).
    skipped_failed : tuple of str
        Galaxies skipped because they failed before (resume without retry).
    seconds : float
        Wall time of the run.
    """

    report: Path
    ok: Tuple[str, ...]
    failed: Tuple[str, ...]
    skipped_done: Tuple[str, ...]
    skipped_failed: Tuple[str, ...]
    seconds: float

    @property
    def all_ok(self) -> bool:
        """True when every galaxy of the batch has its outputs."""
        return not self.failed and not self.skipped_failed


def _plan(galaxies: Dict[str, Path], report: _Report, out_dir: Path, resume: bool, retry_failed: bool,
          is_done: Optional[IsDone]) -> Tuple[List[str], List[str], List[str]]:
    """Split the galaxies into (to run, skipped as done, skipped as failed)."""
    to_run, done, failed = [], [], []
    for name, path in galaxies.items():
        status = report.status(name) if resume else None
        if status == OK and (is_done is None or is_done(str(path), str(out_dir))):
            done.append(name)
        elif status == FAILED and not retry_failed:
            failed.append(name)
        else:
            if status == OK:
                log.info("%s: marked ok in %s but its outputs are missing; running it again", name, report.path.name)
            to_run.append(name)
    return to_run, done, failed


def run_batch(
    inputs: Iterable[Any],
    process_one: ProcessOne,
    out_dir,
    *,
    executor,
    resume: bool = False,
    retry_failed: bool = False,
    shard: Optional[Shard] = None,
    timeout: Optional[float] = None,
    progress: Optional[Callable[[BatchState], None]] = None,
    is_done: Optional[IsDone] = None,
) -> BatchResult:
    """Process every galaxy file on ``executor``; never stop on a failed galaxy.

    Parameters
    ----------
    inputs : iterable of path-like
        Galaxy files (see :func:`read_list` for ``--from-list``). The galaxy name is
        the file stem; two different files with one name are an error.
    process_one : callable
        ``process_one(path, out_dir) -> dict`` (or ``None``): processes one galaxy and
        writes its outputs into ``out_dir``. Must pickle for process-based executors:
        a top-level function, or a ``functools.partial`` of one with picklable
        arguments (e.g. the configuration). Its summary becomes extra report columns
        (keys that clash with :data:`REPORT_COLUMNS` are dropped).
    out_dir : path-like
        Output folder (created if needed); holds the report and ``batch_logs/``.
    executor : sphot_core.stages.Executor
        Runs the jobs. Not entered or closed here: the caller owns it (``with``).
    resume : bool
        Skip galaxies whose report row is ``ok`` (and, with ``is_done``, whose outputs
        exist). Without it every galaxy runs again.
    retry_failed : bool
        With ``resume``: also run galaxies whose row is ``failed`` (without ``resume``
        they run anyway).
    shard : (int, int) or str, optional
        ``(I, N)`` or ``"I/N"``: process only the galaxies with ``shard_of(name, N) ==
        I``; the report is then ``batch_report.shard-I-of-N.csv``.
    timeout : float, optional
        Time limit per galaxy in seconds (``None`` or 0: none).
    progress : callable, optional
        Called with a :class:`BatchState` at the start, after every galaxy and at the
        end (use :class:`ProgressReporter` for the default line).
    is_done : callable, optional
        ``is_done(path, out_dir) -> bool``: whether a galaxy's outputs exist; checked
        on resume for galaxies marked ``ok``.

    Returns
    -------
    BatchResult
    """
    start = time.monotonic()
    out = ensure_output_dir(out_dir)
    galaxies = _galaxy_paths(inputs)
    shard = _as_shard(shard)
    if shard is not None:
        galaxies = {name: galaxies[name] for name in select_shard(galaxies, shard)}
        log.info("shard %d/%d: %d galaxies", shard[0], shard[1], len(galaxies))
    report_path = out / report_name(shard)
    with _exclusive(report_path):
        report = _Report(report_path)
        to_run, done, failed_before = _plan(galaxies, report, out, resume, retry_failed, is_done)
        for name in to_run:
            report.queue(name, galaxies[name])
        report.write()
        tally = _Tally(len(galaxies), len(to_run), len(done) + len(failed_before), executor)
        if progress is not None:
            progress(tally.state(start))
        jobs = [GalaxyJob(name, str(galaxies[name]), str(out)) for name in to_run]
        try:
            fn = functools.partial(_run_galaxy, process_one)
            with contextlib.closing(executor.run(fn, jobs, timeout=timeout)) as outcomes:
                for outcome in outcomes:
                    _record(report, out, outcome)
                    report.write()
                    tally.add(outcome)
                    if progress is not None:
                        progress(tally.state(start, last=outcome.job.name))
        finally:
            if progress is not None:
                progress(tally.state(start, final=True))
    return BatchResult(report_path, tuple(tally.ok), tuple(tally.failed), tuple(done), tuple(failed_before),
                       time.monotonic() - start)


def _record(report: _Report, out: Path, outcome) -> None:
    """Update the report row (and the error log) of a finished galaxy."""
    job: GalaxyJob = outcome.job
    fields: Dict[str, Any] = {
        "path": job.path,
        "seconds": round(outcome.seconds, 3),
        "attempts": report.attempts(job.name) + 1,
        "finished_at": _now(),
    }
    if outcome.ok:
        _remove_error_log(out, job.name)
        summary = {str(k): _summary_value(v) for k, v in (outcome.result or {}).items()}
        summary = {k: v for k, v in summary.items() if k not in REPORT_COLUMNS}
        report.update(job.name, status=OK, error="", log="", **fields, **summary)
        log.info("%s: ok in %.1f s", job.name, outcome.seconds)
    else:
        relative = _write_error_log(out, job.name, Path(job.path), outcome)
        report.update(job.name, status=FAILED, error=outcome.error, log=relative, **fields)
        log.warning("%s failed: %s (see %s)", job.name, outcome.error, out / relative)


class _Tally:
    """Counts for the progress line."""

    def __init__(self, total: int, to_run: int, skipped: int, executor):
        self.total, self.to_run, self.skipped, self.executor = total, to_run, skipped, executor
        self.ok: List[str] = []
        self.failed: List[str] = []

    def add(self, outcome) -> None:
        (self.ok if outcome.ok else self.failed).append(outcome.job.name)

    def state(self, start: float, last: Optional[str] = None, final: bool = False) -> BatchState:
        remaining = self.to_run - len(self.ok) - len(self.failed)
        return BatchState(
            total=self.total,
            to_run=self.to_run,
            ok=len(self.ok),
            failed=len(self.failed),
            skipped=self.skipped,
            running=0 if final else min(getattr(self.executor, "slots", 1) or 1, remaining),
            elapsed=time.monotonic() - start,
            last=last,
            final=final,
        )


# ------------------------------------------------------------------------ merge


@attrs.frozen
class MergeResult:
    """What :func:`merge_catalogs` wrote."""

    galaxy_catalog: Path
    sources_catalog: Path
    galaxies: Tuple[str, ...]
    excluded: Tuple[str, ...]


def _report_statuses(folder: Path) -> Dict[str, str]:
    """Galaxy -> status from the batch reports of a folder (newest report wins)."""
    statuses: Dict[str, str] = {}
    for path in sorted(folder.glob("batch_report*.csv"), key=lambda p: (p.stat().st_mtime, p.name)):
        for name, row in _Report(path).rows.items():
            statuses[name] = row.get("status", "")
    return statuses


def _find_tables(out_dirs: Sequence[Any]) -> Tuple[Dict[str, Dict[str, Path]], List[str]]:
    """kind -> {galaxy: csv path} over all folders, and the galaxies excluded by a report."""
    tables: Dict[str, Dict[str, Path]] = {"galaxy": {}, "sources": {}}
    excluded: List[str] = []
    for folder in dict.fromkeys(Path(d).absolute() for d in out_dirs):
        if not folder.is_dir():
            raise InputError(f"output folder {folder} does not exist", path=str(folder))
        statuses = _report_statuses(folder)
        for kind, found in tables.items():
            suffix = f"_{kind}.csv"
            for path in sorted(folder.glob(f"*{suffix}")):
                name = path.name[: -len(suffix)]
                if not name or name == "catalog":
                    continue
                if statuses.get(name, OK) != OK:
                    excluded.append(name)
                    continue
                if name in found and found[name] != path:
                    raise InputError(f"galaxy {name!r} has outputs in two folders: {found[name].parent} and {folder}",
                                     galaxy=name)
                found[name] = path
    return tables, sorted(set(excluded))


def _concatenate(files: Dict[str, Path]) -> Tuple[List[str], List[Dict[str, str]]]:
    """Rows of every file with a leading ``galaxy`` column, galaxies sorted by name."""
    columns: Dict[str, None] = {}
    rows: List[Dict[str, str]] = []
    for name in sorted(files):
        try:
            with open(files[name], newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                columns.update(dict.fromkeys(c for c in (reader.fieldnames or []) if c != "galaxy"))
                rows.extend({**row, "galaxy": name} for row in reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"cannot read {files[name]}: {exc}", path=str(files[name])) from None
    return ["galaxy", *columns], rows


def merge_catalogs(out_dirs: Sequence[Any], dest_dir) -> MergeResult:
    """Build ``catalog_galaxy.csv`` and ``catalog_sources.csv`` in ``dest_dir``.

    Concatenates the ``NAME_galaxy.csv`` and ``NAME_sources.csv`` files found directly
    in ``out_dirs`` with a leading ``galaxy`` column (NAME). Rows are ordered by galaxy
    name, then kept in each file's own order (filters as the engine wrote them,
    sources by id); values are copied verbatim. Columns are the union of the files'
    columns in first-seen order. Galaxies that a batch report in their folder marks as
    ``failed`` or ``pending`` are left out (their files may be stale or partial); a
    galaxy found in two folders is an error. ``catalog`` is not a valid galaxy name.
    """
    tables, excluded = _find_tables(out_dirs)
    if not tables["galaxy"] and not tables["sources"]:
        folders = ", ".join(str(d) for d in out_dirs)
        raise InputError(f"no NAME_galaxy.csv or NAME_sources.csv files in {folders}")
    if excluded:
        log.warning("merge: left out %d galaxies not ok in their batch report: %s",
                    len(excluded), ", ".join(excluded))
    dest = ensure_output_dir(dest_dir)
    written = {}
    for kind, files in tables.items():
        columns, rows = _concatenate(files)
        written[kind] = write_csv(dest / f"catalog_{kind}.csv", columns, rows)
    names = sorted(set(tables["galaxy"]) | set(tables["sources"]))
    log.info("merge: %d galaxies into %s", len(names), dest)
    return MergeResult(written["galaxy"], written["sources"], tuple(names), tuple(excluded))
