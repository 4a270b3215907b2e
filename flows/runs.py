"""The runs of a storage root, as the CLI lists them and records them.

`<root>/runs/<id>/` holds:
- `run.json`: the run's record, written by the flows (flows/patch_evaluate.py `run_record`): its
  keys, config and preset, and its `report` once the report stage has run;
- `invocation.json`: written by `nlrewrite run` when it starts (`outcome: running`) and again when
  it ends (`done`, `stopped after STAGE`, `failed: ...`, with the time): a run killed mid-way stays
  `running`, so it lists as not finished;
- `log.txt`: the log of every `nlrewrite run` of that id (Prefect's flow and task lines, nlrewrite's
  own), appended. On an S3 root it is written locally while the run works and uploaded at its end
  (then it holds the last invocation's log only).

A storage root is read as untrusted: a record that is not what it should be is one line naming the
file (`Damaged`), and the other runs still list.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from nlrewrite_core.storage import ArtifactInvalid, Store, UnsafeName, check_name

RUN_RECORD = "run.json"
INVOCATION = "invocation.json"
LOG = "log.txt"
RUNS_COLUMNS = ["run_id", "preset", "started", "finished", "report"]


class RunRecord(BaseModel):
    """What the CLI reads of a run.json (other fields are kept, unread)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    preset: str
    keys: dict[str, str]
    config: dict[str, Any]
    report: str | None = None


class Invocation(BaseModel):
    """One `nlrewrite run` of a run id: when it started and how it ended."""

    run_id: str
    preset: str
    started: str
    finished: str | None = None
    outcome: str = "running"
    argv: list[str] = []
    log: str = ""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_model(store: Store, path: str, model: type[BaseModel]) -> Any:
    """The file parsed as `model`; None when it is missing; ArtifactInvalid (one line naming the file)
    when it is not JSON or not that record."""
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        return model.model_validate(json.loads(data))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ValidationError
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            why = f"field {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
        else:
            why = str(e).splitlines()[0]
        raise ArtifactInvalid(f"{store.uri_of(path)} is damaged ({why})") from None


def run_row(store: Store, run_id: str) -> list[Any] | None:
    """(run_id, preset, started, finished, report) of one run; None for a directory with no record."""
    base = store.path("runs", run_id)
    record: RunRecord | None = read_model(store, f"{base}/{RUN_RECORD}", RunRecord)
    inv: Invocation | None = read_model(store, f"{base}/{INVOCATION}", Invocation)
    if record is None and inv is None:
        return None
    report = record.report if record is not None else None
    if inv is None:
        finished = "yes" if report else "no"
    elif inv.outcome == "done":
        finished = inv.finished or "yes"
    else:
        finished = "no (running or killed)" if inv.outcome == "running" else f"no ({inv.outcome})"
    preset = record.preset if record is not None else inv.preset if inv is not None else ""
    return [run_id, preset, inv.started if inv is not None else "", finished, report or ""]


def list_runs(store: Store) -> tuple[list[list[Any]], list[str]]:
    """The rows of every run under the root (oldest first; unknown start times last), and one line per
    damaged record or unsafe directory name (those runs are left out)."""
    rows: list[list[Any]] = []
    problems: list[str] = []
    for name in store.listdir(store.path("runs")):
        try:
            check_name(name, f"run directory {store.uri('runs')}/")
            row = run_row(store, name)
        except (ArtifactInvalid, UnsafeName) as e:
            problems.append(str(e))
            continue
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: (r[2] == "", r[2], r[0]))
    return rows, problems


class RunFiles:
    """The files `nlrewrite run` keeps under runs/<id>/: invocation.json and log.txt.

    `start()` writes the invocation as running and opens the log (the run's directory on a local
    root, a temporary file for S3); `end(outcome)` records how it ended and uploads an S3 log;
    `discard()` removes what `start` wrote (a run refused with exit 2 leaves nothing)."""

    def __init__(self, store: Store, run_id: str, preset: str, argv: list[str]):
        self.store, self.run_id = store, run_id
        self.base = store.path("runs", run_id)
        self.invocation = Invocation(run_id=run_id, preset=preset, started=now(), argv=argv,
                                     log=store.uri("runs", run_id, LOG))
        self.created: list[Path] = []  # local directories this run created (deepest first)
        self.prior: bytes | None = None  # an earlier run's invocation.json
        self.log_size: int | None = None  # and the length of its log
        if store.is_s3:
            fd, tmp = tempfile.mkstemp(prefix=f"nlrewrite-{run_id}-", suffix=".log.txt")
            os.close(fd)
            self.log = Path(tmp)
        else:
            self.log = Path(self.base) / LOG

    def start(self) -> None:
        try:  # what an earlier run of this id left, for discard() to put back
            self.prior = self.store.read_bytes(f"{self.base}/{INVOCATION}")
        except FileNotFoundError:
            self.prior = None
        self.log_size = self.log.stat().st_size if self.log.exists() else None
        if not self.store.is_s3:
            p = Path(self.base)
            while not p.exists():
                self.created.append(p)
                p = p.parent
            Path(self.base).mkdir(parents=True, exist_ok=True)
        self.store.write_json(f"{self.base}/{INVOCATION}", self.invocation.model_dump())
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"==== nlrewrite run {self.run_id} (preset {self.invocation.preset}) started "
                    f"{self.invocation.started}: {' '.join(self.invocation.argv)}\n")

    def end(self, outcome: str) -> None:
        self.invocation = self.invocation.model_copy(update={"finished": now(), "outcome": outcome})
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"==== nlrewrite run {self.run_id} ended {self.invocation.finished}: {outcome}\n")
        self.store.write_json(f"{self.base}/{INVOCATION}", self.invocation.model_dump())
        if self.store.is_s3:
            self.store.write_bytes(f"{self.base}/{LOG}", self.log.read_bytes())
            self.log.unlink(missing_ok=True)

    def discard(self) -> None:
        """Undo start(): an earlier run's invocation record and log are put back as they were."""
        if self.prior is not None:
            self.store.write_bytes(f"{self.base}/{INVOCATION}", self.prior)
        else:
            with contextlib.suppress(OSError):
                self.store.fs.delete_file(f"{self.base}/{INVOCATION}")
        with contextlib.suppress(OSError):
            if self.log_size is None or self.store.is_s3:
                self.log.unlink()
            else:
                os.truncate(self.log, self.log_size)
        for d in self.created:
            try:
                d.rmdir()
            except OSError:
                break

    @contextlib.contextmanager
    def recording(self, refused: tuple[type[BaseException], ...]) -> Iterator[RunFiles]:
        """start(); on the way out end() with "failed: ..." for an exception, or discard() when the
        exception is one of `refused` (bad input found inside the flow). A normal exit leaves the
        ending to the caller, who knows the outcome."""
        self.start()
        try:
            yield self
        except refused:
            self.discard()
            raise
        except BaseException as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.end(f"failed: {type(e).__name__}" + (f": {why[:200]}" if why else ""))
            raise


def print_problems(problems: list[str]) -> None:
    for p in problems:
        print(f"nlrewrite: warning: {p}", file=sys.stderr)


class NotFinished(ValueError):
    """The run has no report (yet): it stopped or was killed before the report stage."""


def finished_result(store: Store, run_id: str) -> tuple[str, dict[str, Any]]:
    """(the run's CE positions, its result as `nlrewrite run` prints it: run_id, ce rows, summary,
    run_json, report), read from the storage root; the CE table is verified against its manifest."""
    from nlrewrite_core.query import load_run, query

    path = store.path("runs", run_id, RUN_RECORD)
    record: RunRecord | None = read_model(store, path, RunRecord)
    if record is None:
        load_run(store, run_id)  # RunNotFound, naming the runs there
        raise FileNotFoundError(store.uri_of(path))
    positions = (record.config.get("evaluate") or {}).get("positions")
    if not isinstance(positions, str) or "report" not in record.keys or "evaluate" not in record.keys:
        raise ArtifactInvalid(f"{store.uri_of(path)} is damaged (no evaluate positions or report key)")
    if not record.report:
        raise NotFinished(f"run {run_id!r} has no report: it stopped before the report stage or was killed "
                          f"(`nlrewrite runs` shows how it ended; `nlrewrite run` with its config resumes it)")
    try:
        summary = store.read_manifest("report", record.keys["report"]).get("metrics", {}).get("summary", {})
    except FileNotFoundError:
        raise NotFinished(f"run {run_id!r}: its report artifact {record.keys['report']} is gone from "
                          f"{store.root}; `nlrewrite run` with its config makes it again") from None
    cols, rows = query(store, run_id, "select * from ce")
    return positions, {"run_id": run_id, "ce": [dict(zip(cols, r)) for r in rows], "summary": summary,
                       "run_json": store.uri("runs", run_id, RUN_RECORD), "report": record.report}
