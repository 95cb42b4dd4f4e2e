"""Progress reporting: a live per-band display on a terminal, plain log lines elsewhere.

The engine emits small event dicts through a callable; reporters turn them into output.
Events cross process boundaries (bands fitted in worker processes) through a queue
drained by a thread in the parent (:class:`QueueRelay`).

Event keys: ``band`` (filter), ``stage`` (``prep``, ``start``, ``primer``,
``scale-primer``, ``loop``, ``polish``, ``done``, ``failed``), ``step`` (what starts
now: ``sersic``, ``stars``, ``calibration``; such events carry nothing else),
``iteration``, ``chi2_dof``, ``n_sources``, ``message``.

On a terminal, log records and the live block share the screen: the CLI's log handler
(:class:`LiveHandler`) erases the block, prints the record and redraws the block, so
no log line is overwritten.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

__all__ = ["Progress", "LogReporter", "TerminalReporter", "LiveHandler", "make_reporter", "interactive", "QueueRelay", "null_progress"]

log = logging.getLogger("sphot_core.progress")

Progress = Callable[[Dict[str, Any]], None]


def null_progress(event: Dict[str, Any]) -> None:
    """A reporter that ignores everything."""


def _describe(ev: Dict[str, Any]) -> str:
    parts = [ev.get("stage", "")]
    if ev.get("iteration") is not None:
        parts.append(f"iter {ev['iteration']}")
    if ev.get("step"):
        parts.append(ev["step"])
    if ev.get("chi2_dof") is not None:
        parts.append(f"chi2/dof {ev['chi2_dof']:.3g}")
    if ev.get("n_sources") is not None:
        parts.append(f"{ev['n_sources']} sources")
    if ev.get("message"):
        parts.append(str(ev["message"]))
    return ", ".join(p for p in parts if p)


class LogReporter:
    """Plain log lines (batch jobs, CI, files): one line per finished step."""

    def __init__(self, name: str = ""):
        self.name = name

    def __call__(self, ev: Dict[str, Any]) -> None:
        if ev.get("step"):
            return  # only log completed steps, not "starting" notices
        prefix = f"{self.name} " if self.name else ""
        band = f"[{ev['band']}] " if ev.get("band") else ""
        level = logging.WARNING if ev.get("stage") == "failed" else logging.INFO
        log.log(level, "%s%s%s", prefix, band, _describe(ev))


class TerminalReporter:
    """A live block with one line per band, redrawn in place (at most 10 times/s)."""

    def __init__(self, name: str = "", stream=None):
        self.name = name
        self.stream = stream or sys.stderr
        self.lines: Dict[str, str] = {}
        self.started: Dict[str, float] = {}
        self._drawn = 0
        self._last = 0.0
        self._lock = threading.RLock()
        TerminalReporter.active = self

    def __call__(self, ev: Dict[str, Any]) -> None:
        band = ev.get("band") or "-"
        with self._lock:
            self.started.setdefault(band, time.monotonic())
            elapsed = time.monotonic() - self.started[band]
            self.lines[band] = f"{band:>8}  {elapsed:6.1f}s  {_describe(ev)}"
            final = ev.get("stage") in ("done", "failed")
            if final or time.monotonic() - self._last > 0.1:
                self._draw()

    def erase(self) -> None:
        """Remove the block from the screen (the next draw starts where it was)."""
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self.stream.flush()
            self._drawn = 0

    def _draw(self) -> None:
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # cursor up to the start of the block
        title = f"sphot {self.name}".rstrip()
        block = [title] + list(self.lines.values())
        cols = _columns()
        for line in block:
            out.append("\x1b[2K" + line[: cols - 1] + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(block)
        self._last = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self.lines:
                self._draw()
        if TerminalReporter.active is self:
            TerminalReporter.active = None


TerminalReporter.active = None


class LiveHandler(logging.StreamHandler):
    """A stream handler that keeps the live block of an active TerminalReporter intact:
    the block is erased, the record printed, and the block drawn again below it."""

    def emit(self, record: logging.LogRecord) -> None:
        live = TerminalReporter.active
        if live is None or live.stream is not self.stream:
            super().emit(record)
            return
        with live._lock:
            live.erase()
            super().emit(record)
            if live.lines:
                live._draw()


def interactive(stream=None) -> bool:
    """Whether ``stream`` is a terminal that live displays may redraw: a TTY, not
    ``TERM=dumb``, and sphot's logging not quieted below INFO (``-q``)."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"
    return bool(tty) and logging.getLogger("sphot_core").getEffectiveLevel() <= logging.INFO


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def make_reporter(name: str = "", stream=None, interactive: Optional[bool] = None) -> Callable:
    """A terminal reporter when ``stream`` is a TTY (and logging is not quieted), else log lines."""
    stream = stream or sys.stderr
    live = globals()["interactive"](stream) if interactive is None else interactive
    return TerminalReporter(name, stream) if live else LogReporter(name)


class QueueRelay:
    """Forward events put on a multiprocessing queue (by workers) to a reporter.

    ``relay.queue`` is picklable (a manager proxy) and can be handed to worker
    processes; ``relay.emitter()`` returns a picklable callable that puts events on it.
    """

    def __init__(self, reporter: Callable[[Dict[str, Any]], None]):
        import multiprocessing

        self.reporter = reporter
        self._manager = multiprocessing.get_context("spawn").Manager()
        self.queue = self._manager.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            ev = self.queue.get()
            if ev is None:
                return
            try:
                self.reporter(ev)
            except Exception:  # a display problem must never stop a fit
                log.debug("progress reporter failed", exc_info=True)

    def emitter(self) -> "QueueEmitter":
        return QueueEmitter(self.queue)

    def close(self) -> None:
        try:
            self.queue.put(None)
            self._thread.join(timeout=5)
        finally:
            self._manager.shutdown()


class QueueEmitter:
    """Picklable callable putting events on a (manager) queue; never raises."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, ev: Dict[str, Any]) -> None:
        try:
            self.queue.put(dict(ev))
        except Exception:
            pass
