"""What `nlrewrite run` shows while it works: one line per stage and a progress bar for long work.

The library emits progress events (nlrewrite_core.progress: DEBUG records on `nlrewrite.progress`
carrying a StageEvent or a Step). `Console` renders them:

    corpus       cached
    subject      done       12.3 s
    simulate     done       41.0 s  8 shards (3 cached)

A stage with sub parts (simulation shards) is one line with a count, not one line per part. A Step
(120 of 400 subject steps) draws a bar redrawn in place on a terminal (carriage return), and on
anything else (CI logs, pytest capture) a plain line each time the work passes another tenth.

`run_logging` installs it for a run: progress records go to the console only; every INFO record
(Prefect's flow and task lines, nlrewrite's own) goes to the run's log file, and to the console
only when `verbose` (else the console shows warnings and errors, one line each).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nlrewrite_core.progress import StageEvent, Step

PROGRESS_LOGGER = "nlrewrite.progress"
NAME_WIDTH = 12
BAR_WIDTH = 24
REDRAW_S = 0.1
"""A terminal's bar is redrawn at most this often (and always at the end of the work)."""


def seconds(s: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


@dataclass
class _Line:
    """The state of one stage's line."""

    stage: str
    t0: float
    subs_done: set[str] = field(default_factory=set)
    subs_cached: set[str] = field(default_factory=set)
    unit: str = "part"
    step: Step | None = None
    tenths_shown: int = 0
    final: bool = False

    def parts(self) -> str:
        n = len(self.subs_done) + len(self.subs_cached)
        if not n:
            return ""
        return f"{n} {self.unit}{'s' if n != 1 else ''}" + (f" ({len(self.subs_cached)} cached)"
                                                      if self.subs_cached and self.subs_done else "")


class Console(logging.Handler):
    """Renders progress records (and, attached to the root logger, warnings and errors) on `stream`.

    `tty` (default: `stream.isatty()`) chooses in-place redrawing over throttled plain lines.
    `finished` lists (stage, "cached" | "done") in the order the stages ended."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        super().__init__(logging.DEBUG)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.lines: dict[str, _Line] = {}
        self.live = ""  # what is drawn without a newline on a terminal
        self.last_draw = 0.0
        self.finished: list[tuple[str, str]] = []

    # ---- records ----------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            ev = getattr(record, "progress", None)
            if isinstance(ev, StageEvent):
                record.repeated = not self.stage_event(ev)  # the log file skips it too
            elif isinstance(ev, Step):
                self.step(ev)
            elif record.levelno >= logging.WARNING:
                self.message(record)
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def stage_event(self, ev: StageEvent) -> bool:
        """Render `ev`; False when it repeats what is shown (a stage found cached again)."""
        line = self.lines.get(ev.stage)
        if ev.state == "cached" and line is not None and (line.final or ev.sub in line.subs_done | line.subs_cached):
            return False  # found again: the task wrapper checks what the stage function made or reused
        if line is None or (line.final and ev.state == "running"):
            line = self.lines[ev.stage] = _Line(ev.stage, time.monotonic())
            if ev.state == "running" and not ev.sub and not self.tty:
                self.write(self.text(ev.stage, "running"))
        if ev.sub:
            line.unit = ev.sub.rsplit("-", 1)[0]
            if ev.state == "cached":
                line.subs_cached.add(ev.sub)
            elif ev.state == "done":
                line.subs_done.add(ev.sub)
            self.draw(line)
            return True
        if ev.state == "running":
            self.draw(line)
            return True
        line.final = True
        self.clear_live()
        took = time.monotonic() - line.t0 if line.subs_done or ev.seconds is None else ev.seconds
        self.write(self.text(ev.stage, ev.state, seconds(took) if ev.state == "done" else "", line.parts()))
        self.finished.append((ev.stage, ev.state))
        return True

    def step(self, s: Step) -> None:
        line = self.lines.get(s.stage)
        if line is None or line.final:
            line = self.lines[s.stage] = _Line(s.stage, time.monotonic())
        line.step = s
        if self.tty:
            self.draw(line, force=s.done >= s.total)
            return
        tenths = min(10, 10 * s.done // max(1, s.total))
        if tenths > line.tenths_shown:
            line.tenths_shown = tenths
            self.write(self.text(s.stage, f"{100 * s.done // max(1, s.total)}%", "", f"{s.done} / {s.total} {s.unit}"))

    def message(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip().splitlines()
        msg = text[0] if text else ""
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            msg += f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        self.write(f"{record.levelname.lower()}: {msg}")

    # ---- output -----------------------------------------------------------------------------
    @staticmethod
    def text(stage: str, state: str, took: str = "", more: str = "") -> str:
        return f"  {stage:<{NAME_WIDTH}} {state:<7} {took:>10}  {more}".rstrip()

    def write(self, text: str) -> None:
        """A whole line; on a terminal the live line is cleared first and drawn again after."""
        if self.tty and self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self.tty and self.live:
            self.stream.write(self.live)

    def draw(self, line: _Line, force: bool = False) -> None:
        """The live line of a running stage (terminal only): its bar or its count of parts."""
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < REDRAW_S:
            return
        self.last_draw = now
        more = line.parts()
        if line.step is not None:
            s = line.step
            fill = BAR_WIDTH * min(s.done, s.total) // max(1, s.total)
            counted = s.unit == f"{line.unit}s"  # a bar over the stage's own parts: their count once
            more = f"[{'#' * fill}{'.' * (BAR_WIDTH - fill)}] {s.done} / {s.total} {s.unit}" + (
                f"  {more}" if more and not counted else "")
        self.live = self.text(line.stage, "running", seconds(now - line.t0), more)
        self.stream.write("\r\x1b[K" + self.live)

    def clear_live(self) -> None:
        if self.tty and self.live:
            self.stream.write("\r\x1b[K")
        self.live = ""

    def close(self) -> None:
        self.clear_live()
        self.stream.flush()
        super().close()


class _LogFileFilter(logging.Filter):
    """The run's log file: INFO and above, plus the stage events the console showed (not every step
    of a bar, nor a stage found cached again)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(getattr(record, "progress", None), StageEvent):
            return not getattr(record, "repeated", False)
        return record.levelno >= logging.INFO


class _Nothing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def log_formatter() -> logging.Formatter:
    """Prefect's formatter (flow and task run names) with the date, for the log file."""
    fmt = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
    try:
        from prefect.logging.formatters import PrefectFormatter
    except ImportError:  # pragma: no cover - Prefect is a dependency of flows/
        return logging.Formatter(fmt)
    return PrefectFormatter(fmt, datefmt="%Y-%m-%d %H:%M:%S",
                            flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
                            task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s")


@contextlib.contextmanager
def run_logging(log_file: Path, verbose: bool = False, stream: TextIO | None = None) -> Iterator[Console]:
    """For the block: progress rendered by a Console on `stream` (stderr); INFO records of every
    logger appended to `log_file`; Prefect's console handlers silenced unless `verbose` (the Console
    then shows warnings and errors). Everything is restored after the block."""
    console = Console(stream, tty=False if verbose else None)  # verbose: plain lines among Prefect's
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setLevel(logging.DEBUG)
    to_file.addFilter(_LogFileFilter())
    to_file.setFormatter(log_formatter())
    root, progress = logging.getLogger(), logging.getLogger(PROGRESS_LOGGER)
    saved = progress.level, progress.propagate
    progress.setLevel(logging.DEBUG)
    progress.propagate = False  # the DEBUG records never reach Prefect's handlers
    progress.addHandler(console)
    progress.addHandler(to_file)
    root.addHandler(to_file)
    silenced: list[logging.Handler] = []
    nothing = _Nothing()
    if not verbose:
        from prefect.logging.handlers import PrefectConsoleHandler

        silenced = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
        for h in silenced:
            h.addFilter(nothing)
        root.addHandler(console)
    try:
        yield console
    finally:
        for h in silenced:
            h.removeFilter(nothing)
        for logger in (root, progress):
            logger.removeHandler(console)
            logger.removeHandler(to_file)
        progress.setLevel(saved[0])
        progress.propagate = saved[1]
        console.close()
        to_file.close()
