"""Integrity in a real run (Prefect flow on the micro preset): damaged artifacts are found on reuse,
named in one warning and recomputed byte-identical; `nlrewrite verify [--repair]`; unsafe run ids
and preset names refused; a full disk is one line naming the root and leaves no file."""

from __future__ import annotations

import errno
import gc
import io
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nlrewrite_core import manifest, storage
from flows.cli import main
from nlrewrite_core.storage import MANIFEST, STAGING, Store


@contextmanager
def warnings_of_nlrewrite() -> Iterator[list[str]]:
    """Warnings logged on the `nlrewrite` logger (in tasks too), as strings."""
    got: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                got.append(record.getMessage())

    h = Collect()
    logging.getLogger("nlrewrite").addHandler(h)
    try:
        yield got
    finally:
        logging.getLogger("nlrewrite").removeHandler(h)


@pytest.fixture
def run_copy(micro_run, tmp_path) -> tuple[str, dict]:
    """A private copy of the session's micro run (damaged freely here)."""
    storage_dir, result = micro_run
    root = tmp_path / "root"
    shutil.copytree(storage_dir, root, ignore=shutil.ignore_patterns(".cache"))
    return str(root), result


def artifact(root: str, result: dict, stage: str, name: str = "") -> Path:
    return Path(root, "artifacts", stage, result["keys"][stage], name)


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(root: str) -> list[str]:
    return [p.as_posix() for p in Path(root).rglob("*") if ".tmp-" in p.name or p.name.startswith(STAGING)]


def test_tampered_or_deleted_artifacts_are_redone_even_when_prefect_cached(prefect_server, run_copy):
    """A valid Parquet file with other scores (what `copy ... to` could write before): the next run,
    all Prefect cache hits, names it in one warning and recomputes it byte-identical. The manifest is
    the source of truth: a Prefect cache hit on a stage whose manifest was deleted (calibrate, in the
    patch-evaluate subflow) reruns it too."""
    from flows.rewrite import rewrite

    root, result = run_copy
    rewrite(preset="micro", storage=root, run_id="micro-test")  # Prefect cache records for this root
    calibration = artifact(root, result, "calibrate", "calibration.parquet").read_bytes()
    artifact(root, result, "calibrate", MANIFEST).unlink()
    scores = artifact(root, result, "score", "scores.parquet")
    original = scores.read_bytes()
    t = pq.read_table(scores)
    t = t.set_column(t.column_names.index("score"), "score", pa.array(t.column("score").to_numpy()[::-1]))
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    scores.write_bytes(buf.getvalue())
    manifest._VERIFIED.clear()  # as in a new process
    with warnings_of_nlrewrite() as warned:
        again = rewrite(preset="micro", storage=root, run_id="micro-test")
    assert len(warned) == 1 and "scores.parquet" in warned[0] and "recomputing" in warned[0], warned
    assert scores.read_bytes() == original
    assert Store(root).has_manifest("calibrate", result["keys"]["calibrate"])
    assert artifact(root, result, "calibrate", "calibration.parquet").read_bytes() == calibration
    assert again["ce"] == result["ce"]
    assert leftovers(root) == []


@pytest.mark.parametrize("stage, name, damage, why", [
    ("activations", "activations.parquet", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes"),
    ("explain", MANIFEST, lambda p: p.write_bytes(b"\x00garbage{"), "not JSON"),
    ("calibrate", MANIFEST, lambda p: p.write_bytes(b""), "empty"),
    ("simulate", "shard-00001/predictions.parquet", lambda p: p.unlink(), "missing"),
])
def test_damaged_stage_is_recomputed_with_one_warning(prefect_server, run_copy, stage, name, damage, why):
    from flows.rewrite import rewrite

    root, result = run_copy
    path = artifact(root, result, stage, name)
    original = path.read_bytes() if name != MANIFEST else None
    damage(path)
    with warnings_of_nlrewrite() as warned:
        again = rewrite(preset="micro", storage=root, run_id="micro-test")
    assert len(warned) == 1 and name.split("/")[-1] in warned[0] and why in warned[0], warned
    if original is not None:
        assert path.read_bytes() == original  # recomputed, byte-identical
    store = Store(root)
    assert manifest.verify(store, stage, result["keys"][stage], rehash=True) == []
    assert again["ce"] == result["ce"]
    assert leftovers(root) == []


def test_query_names_a_garbage_manifest_in_one_line(run_copy, capsys):
    root, result = run_copy
    artifact(root, result, "score", MANIFEST).write_text("{not json")
    code, out, err = cli(["query", "micro-test", "select count(*) from ce", "--storage", root], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"score/{result['keys']['score']}/_manifest.json: manifest is not JSON" in err


def test_query_refuses_a_damaged_table(run_copy, capsys):
    root, result = run_copy
    ce = artifact(root, result, "evaluate", "ce.parquet")
    ce.write_bytes(ce.read_bytes()[:-10])
    code, out, err = cli(["query", "micro-test", "select count(*) from ce", "--storage", root], capsys)
    assert code == 1 and err.count("\n") == 1 and "ce.parquet" in err and "nlrewrite verify micro-test --repair" in err
    code, out, err = cli(["query", "micro-test", "select count(*) from scores", "--storage", root], capsys)
    assert code == 0, err  # other tables stay readable


def test_verify_then_repair_then_run(prefect_server, run_copy, capsys):
    from flows.rewrite import rewrite

    root, result = run_copy
    code, out, err = cli(["verify", "micro-test", "--storage", root, "--format", "csv"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "artifact,key,status,files,bytes,seconds"
    names = [line.split(",")[0] for line in lines[1:]]
    assert set(result["keys"]) <= set(names) and "simulate/shard-00000" in names
    assert all(line.split(",")[2] == "ok" for line in lines[1:])

    expl = artifact(root, result, "explain", "explanations.parquet")
    original = expl.read_bytes()
    expl.write_bytes(original.replace(b"PAR1", b"PAR2", 1))
    code, out, err = cli(["verify", "micro-test", "--storage", root], capsys)
    assert code == 1 and "damaged: " in err and "explanations.parquet" in err and "DAMAGED" in out
    assert artifact(root, result, "explain", MANIFEST).exists()  # without --repair nothing changes
    code, out, err = cli(["verify", "micro-test", "--storage", root, "--repair"], capsys)
    assert code == 0 and "repaired" in err
    assert not artifact(root, result, "explain", MANIFEST).exists()
    rewrite(preset="micro", storage=root, run_id="micro-test")
    assert expl.read_bytes() == original
    code, out, err = cli(["verify", "micro-test", "--storage", root], capsys)
    assert code == 0, err


@pytest.mark.parametrize("args", [
    ["run", "--preset", "micro", "--run-id", "../../x"],
    ["run", "--preset", "micro", "--run-id", "a/b"],
    ["query", "../../x", "select 1"],
    ["verify", "../x"],
    ["artifacts", "ls", "../x"],
])
def test_unsafe_run_id_exits_2_writing_nothing(tmp_path, capsys, args):
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    code, out, err = cli([*args, "--storage", str(root)], capsys)
    assert code == 2 and err.count("\n") == 1 and "letters, digits" in err, err
    assert list(tmp_path.rglob("*")) == [tmp_path / "deep", root]


def test_unsafe_preset_field_exits_2_writing_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: ../../../escaped\n")
    root = tmp_path / "root"
    code, out, err = cli(["run", "--preset", "micro", "--config", str(cfg), "--storage", str(root)], capsys)
    assert code == 2 and "config field preset" in err and err.count("\n") == 1
    assert not root.exists() and not (tmp_path.parent / "escaped").exists()


def test_run_pipeline_refuses_unsafe_names(prefect_server, tmp_path):
    from flows.rewrite import rewrite

    with pytest.raises(storage.UnsafeName):
        rewrite(preset="micro", storage=str(tmp_path / "root"), run_id="../x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "root" / "runs").exists()


def test_full_disk_is_one_line_naming_the_root_and_leaves_no_file(prefect_server, tmp_path, capsys, monkeypatch):
    """ENOSPC injected in the one call that writes local bytes (half a file, then the error)."""
    def full(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_write_file", full)
    root = tmp_path / "root"
    code, out, err = cli(["run", "--preset", "micro", "--storage", str(root)], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("nlrewrite: error: storage ") and str(root) in last and "no space left" in last
    gc.collect()
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert leftovers(str(root)) == []
