"""The run console (flows/console.py) on the library's own progress events, without a pipeline."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from flows.tables import print_result, rounded
from flows.console import PROGRESS_LOGGER, Console, seconds
from nlrewrite_core import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console():
    """A Console on the progress logger, rendering into a StringIO (not a terminal)."""
    made: list[Console] = []
    logger = logging.getLogger(PROGRESS_LOGGER)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def make(stream: io.StringIO) -> Console:
        c = Console(stream)
        logger.addHandler(c)
        made.append(c)
        return c

    yield make
    for c in made:
        logger.removeHandler(c)
    logger.setLevel(level)
    logger.propagate = propagate


def test_one_line_per_stage_cached_running_done(console):
    out = io.StringIO()
    c = console(out)
    progress.stage_event("corpus", "cached")
    progress.stage_event("subject", "running")
    progress.stage_event("subject", "done", seconds=12.34)
    progress.stage_event("subject", "cached")  # the task wrapper finding what the stage just made: not shown
    progress.stage_event("transcoder", "running")
    progress.stage_event("transcoder", "done", seconds=125.0)
    assert out.getvalue().splitlines() == [
        "  corpus       cached",
        "  subject      running",
        "  subject      done        12.3 s",
        "  transcoder   running",
        "  transcoder   done    2 min 05 s",
    ]
    assert c.finished == [("corpus", "cached"), ("subject", "done"), ("transcoder", "done")]


def test_shards_are_one_line_with_a_count(console):
    out = io.StringIO()
    console(out)
    progress.stage_event("simulate", "running", "shard-00000")
    progress.stage_event("simulate", "done", "shard-00000", 1.0)
    progress.stage_event("simulate", "cached", "shard-00000")  # the wrapper's check after the shard ran
    progress.stage_event("simulate", "cached", "shard-00001")
    progress.stage_event("simulate", "running", "shard-00002")
    progress.stage_event("simulate", "done", "shard-00002", 1.0)
    progress.stage_event("simulate", "running")  # collecting the shards
    progress.stage_event("simulate", "done", seconds=0.2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "shard-" not in lines[0]
    assert re.fullmatch(r"  simulate     done +\d+\.\d s  3 shards \(1 cached\)", lines[0])


def test_a_warm_sharded_stage_is_one_cached_line(console):
    out = io.StringIO()
    console(out)
    for i in range(4):
        progress.stage_event("simulate", "cached", f"shard-{i:05d}")
    progress.stage_event("simulate", "cached")
    assert out.getvalue().splitlines() == ["  simulate     cached              4 shards"]


def test_progress_off_a_terminal_is_a_line_per_tenth(console):
    out = io.StringIO()
    console(out)
    progress.stage_event("subject", "running")
    for i in range(1, 401):
        progress.advance("subject", i, 400, "steps")
    progress.stage_event("subject", "done", seconds=3.0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  subject      running" and lines[-1] == "  subject      done         3.0 s"
    assert lines[1:-1] == [f"  subject      {f'{10 * t}%':<7}{' ' * 13}{40 * t} / 400 steps" for t in range(1, 11)]
    assert lines[1] == "  subject      10%                 40 / 400 steps"


def test_progress_on_a_terminal_is_redrawn_in_place(console):
    out = Tty()
    c = console(out)
    assert c.tty
    progress.stage_event("subject", "running")
    for i in range(1, 51):
        progress.advance("subject", i, 50, "steps")
    c.handle(
        logging.makeLogRecord({"levelno": logging.WARNING, "levelname": "WARNING", "msg": "slow disk"}))
    progress.stage_event("subject", "done", seconds=3.0)
    text = out.getvalue()
    assert "\r\x1b[K  subject      running" in text and "[########################] 50 / 50 steps" in text
    # lines end only where a line is final: the warning and the stage's done line; the bar is drawn
    # again after the warning, and cleared before the done line
    finals = [seg.rsplit("\r\x1b[K", 1)[-1] for seg in text.split("\n")[:-1]]
    assert finals == ["warning: slow disk", "  subject      done         3.0 s"]
    assert text.endswith("\n")


def test_seconds_and_rounded_values():
    assert [seconds(s) for s in (0.04, 59.94, 61, 3725)] == ["0.0 s", "59.9 s", "1 min 01 s", "1 h 02 min"]
    assert rounded({"all/fn=0": None, "all/fn=0.5": 0.9441703038858884}) == "all/fn=0 -, all/fn=0.5 0.9442"
    assert rounded([1.23456789, 2]) == "1.2346, 2" and rounded(float("nan")) == "-" and rounded("x") == "x"


def test_result_prints_no_long_float(capsys):
    ce = [{"condition": "clean", "selection": "all", "fraction": None, "calibration": None, "n_latents": 0,
           "n_true_kept": None, "ce_mean": 3.19712345678, "ce_lo": 3.1, "ce_hi": 3.3, "delta_zero_mean": -0.19,
           "positions": "last"}]
    summary = {"oracle crossing specificity": {"last/fn=0": 0.9929152772702432, "last/fn=0.5": None},
               "FVU (eval)": 0.006512345678, "preset": "tiny"}
    print_result("last", {"run_id": "r", "ce": ce, "summary": summary, "run_json": "x/run.json", "report": "x.html"})
    out = capsys.readouterr().out
    assert "3.1971" in out and "oracle crossing specificity: last/fn=0 0.9929, last/fn=0.5 -" in out
    assert not re.search(r"\d\.\d{5,}", out)


def test_run_files_on_s3_upload_the_log_and_list(tmp_path):
    """An S3 root: the log is written locally while the run works and uploaded at its end; the
    invocation record says how it ended; `runs` reads both from the bucket."""
    from conftest import moto_s3
    from flows.runs import Invocation, RunFiles, list_runs
    from nlrewrite_core.storage import Store

    env = {"AWS_ACCESS_KEY_ID": "AKIANLREWRITETEST001", "AWS_SECRET_ACCESS_KEY": "x" * 40,
           "AWS_DEFAULT_REGION": "us-east-1"}
    with moto_s3(env, ("nlr-runs",)) as url:
        store = Store("s3://nlr-runs/root", endpoint_url=url)
        files = RunFiles(store, "r1", "micro", ["nlrewrite", "run"])
        with files.recording(refused=(ValueError,)):
            with files.log.open("a") as f:
                f.write("a Prefect line\n")
        inv = Invocation.model_validate(store.read_json(store.path("runs", "r1", "invocation.json")))
        assert inv.outcome == "running" and inv.finished is None  # as a killed run leaves it
        files.end("stopped after embed")
        log = store.read_bytes(store.path("runs", "r1", "log.txt")).decode()
        assert "a Prefect line" in log and "ended" in log and not files.log.exists()
        rows, problems = list_runs(store)
        assert problems == [] and rows == [["r1", "micro", inv.started, "no (stopped after embed)", ""]]


def test_run_files_of_a_refused_run_are_removed(tmp_path):
    """Bad input found inside the flow (exit 2) leaves nothing under the root; a failure is recorded."""
    from flows.runs import RunFiles
    from nlrewrite_core.storage import Store

    store = Store(str(tmp_path / "root"))
    with pytest.raises(ValueError), RunFiles(store, "r2", "micro", []).recording(refused=(ValueError,)):
        raise ValueError("corpus too small")
    assert not (tmp_path / "root").exists()
    with pytest.raises(RuntimeError), RunFiles(store, "r3", "micro", []).recording(refused=(ValueError,)):
        raise RuntimeError("boom\nmore")
    r3 = tmp_path / "root" / "runs" / "r3"
    inv, log = (r3 / "invocation.json").read_text(), (r3 / "log.txt").read_text()
    assert json.loads(inv)["outcome"] == "failed: RuntimeError: boom" and json.loads(inv)["finished"]
    with pytest.raises(ValueError), RunFiles(store, "r3", "micro", []).recording(refused=(ValueError,)):
        raise ValueError("refused")  # a refused rerun puts back what the earlier run left
    assert (r3 / "invocation.json").read_text() == inv and (r3 / "log.txt").read_text() == log


def test_shard_progress_is_a_bar_that_counts_them_once(console):
    """The flow reports shards done of all (progress.advance): off a terminal a line per tenth, then the
    one done line; on a terminal one bar with the count, not the count twice."""
    def shards(done_from: int) -> None:
        progress.advance("simulate", done_from, 4, "shards")
        for i in range(done_from, 4):
            progress.stage_event("simulate", "running", f"shard-{i:05d}")
            progress.stage_event("simulate", "done", f"shard-{i:05d}", 1.0)
            progress.advance("simulate", i + 1, 4, "shards")
        progress.stage_event("simulate", "running")
        progress.stage_event("simulate", "done", seconds=0.2)

    out = io.StringIO()
    c = console(out)
    shards(1)
    lines = out.getvalue().splitlines()
    # a resumed stage starts at the shards already done; the percent is the true one, not its tenth
    assert lines[:-1] == [f"  simulate     {f'{25 * i}%':<7}{' ' * 13}{i} / 4 shards" for i in range(1, 5)]
    assert re.fullmatch(r"  simulate     done +\d+\.\d s  3 shards", lines[-1])
    logging.getLogger(PROGRESS_LOGGER).removeHandler(c)
    tty = Tty()
    console(tty)
    shards(0)
    assert "] 4 / 4 shards" in tty.getvalue() and "4 shards  4 shards" not in tty.getvalue()
    assert not re.search(r"shards +\d+ shards", tty.getvalue())
