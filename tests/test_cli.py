"""The CLI contract: bad input exits 2 with one message naming the field or file, writing nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, expected", [
    ("corpus: [unclosed", "not valid YAML"),
    ("corpus:\n  seq_lenn: 32\n", "corpus.seq_lenn: unknown field"),
    ("subject:\n  steps: -3\n", "subject.steps"),
    ("transcoder:\n  layer: 7\n", "transcoder.layer (7) is out of range"),
    ("transcoder:\n  num_latents: 64\n  k: 100\n", "transcoder.k (100) is larger than transcoder.num_latents (64)"),
    ("evaluate:\n  fractions: [0.1, 1.5]\n", "evaluate.fractions"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, yaml_text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    storage = tmp_path / "store"
    code, err = run_cli(["run", "--config", str(cfg), "--storage", str(storage)], capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1  # one message
    assert not storage.exists()  # nothing written


def test_unknown_preset(tmp_path, capsys):
    code, err = run_cli(["run", "--preset", "huge", "--storage", str(tmp_path / "s")], capsys)
    assert code == 2 and "unknown preset 'huge'" in err and "tiny" in err
    assert not (tmp_path / "s").exists()


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["run", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and "does not exist" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_storage_as_user(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = run_cli(["run", "--preset", "micro", "--storage", str(ro / "data")], capsys)
    assert code == 2 and "not writable" in err


def test_storage_under_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = run_cli(["run", "--preset", "micro", "--storage", str(f / "data")], capsys)
    assert code == 2 and "is a file, not a directory" in err and "--storage" in err
    assert f.read_text() == "x"


def test_storage_bad_scheme(capsys):
    code, err = run_cli(["run", "--storage", "gs://bucket/x"], capsys)
    assert code == 2 and "gs://bucket/x" in err


def test_query_unknown_run(micro_run, capsys):
    storage, _ = micro_run
    code, err = run_cli(["query", "no-such-run", "select 1", "--storage", storage], capsys)
    assert code == 2 and "run 'no-such-run' not found" in err and "micro-test" in err


def test_query_bad_sql(micro_run, capsys):
    storage, _ = micro_run
    code, err = run_cli(["query", "micro-test", "select * from no_such_table", "--storage", storage], capsys)
    assert code == 2 and "SQL error" in err and "no_such_table" in err


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_formats(micro_run, capsys, fmt):
    storage, _ = micro_run
    code = main(["query", "micro-test", "select condition, ce_mean from ce where selection = 'all' order by condition",
                 "--storage", storage, "--format", fmt])
    out = capsys.readouterr().out
    assert code == 0
    for cond in ("clean", "mlp_ablation", "transcoder", "zero_ablation"):
        assert cond in out
    if fmt == "csv":
        assert out.splitlines()[0] == "condition,ce_mean"
    if fmt == "json":
        assert out.splitlines()[0].startswith('{"condition": "clean"')


def test_query_latent_metrics_columns(micro_run, capsys):
    storage, _ = micro_run
    code = main(["query", "micro-test", "select latent, detection_score, specificity, sensitivity from latent_metrics limit 3",
                 "--storage", storage, "--format", "csv"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[0] == "latent,detection_score,specificity,sensitivity"


def test_headline_rows_average_random_seeds_and_filter_positions():
    from flows.tables import headline_rows

    def row(cond, sel="all", frac=None, cal="", seed=-1, ce=4.0, positions="all"):
        return {"condition": cond, "selection": sel, "fraction": frac, "calibration": cal, "seed": seed,
                "n_latents": 5, "ce_mean": ce, "ce_lo": ce - 0.1, "ce_hi": ce + 0.1, "delta_zero_mean": ce - 5,
                "positions": positions}

    ce = [row("clean"), row("clean", positions="last", ce=9.0),
          row("simulated", "random", 0.1, "quantile", 0, 4.2), row("simulated", "random", 0.1, "quantile", 1, 4.4),
          row("simulated", "top", 0.1, "quantile", -1, 4.1), row("simulated", "top", 0.1, "isotonic", -1, 7.0),
          {**row("simulated", "top", 1.0, "quantile", -1, 4.6), "n_true_kept": 3},
          {**row("simulated_strict", "all", 1.0, "quantile", -1, 4.9), "n_true_kept": 0}]
    rows = headline_rows(ce, "all")
    assert [r[:4] for r in rows] == [["clean", "all", None, ""], ["simulated", "top", 0.1, "quantile"],
                                     ["simulated", "top", 1.0, "quantile"], ["simulated_strict", "all", 1.0, "quantile"],
                                     ["simulated", "random (x2)", 0.1, "quantile"]]
    assert rows[4][6] == pytest.approx(4.3) and rows[4][7] == pytest.approx(4.1) and rows[4][8] == pytest.approx(4.5)
    assert rows[2][5] == 3 and rows[3][5] == 0  # n_true_kept: the paper's accounting beside the strict one


# ---- every bad setting of issue 12: exit 2, one line naming the field, nothing written -----------------------
def _checkpoint(tmp_path: Path, d_in: int, num_latents: int, k: int) -> str:
    from nlrewrite_core import transcoder, transcoder_train
    from nlrewrite_core.config import TranscoderConfig

    path = tmp_path / f"ckpt-{d_in}-{num_latents}-{k}"
    sae = transcoder_train.new_transcoder(d_in, TranscoderConfig(num_latents=num_latents, k=k))
    transcoder.save_transcoder(sae, path)
    return str(path)


def _without_weights(tmp_path: Path) -> str:
    path = _checkpoint(tmp_path, 32, 128, 8)
    (Path(path) / "sae.safetensors").unlink()
    return path


def _garbage_checkpoint(tmp_path: Path) -> str:
    path = tmp_path / "garbage"
    path.mkdir()
    (path / "cfg.json").write_text("{not json")
    (path / "sae.safetensors").write_bytes(b"\0" * 16)
    return str(path)


def _openai(section: str, method: str) -> str:
    return f"{section}:\n  method: {method}\n  llm: {{backend: openai, model: served}}\n"


BAD_INPUTS = {  # name: (YAML text, or a function of tmp_path giving it; what the one line must say)
    "openai without base_url (explain)": (_openai("explain", "llm"), "explain.llm.base_url: required by the openai"),
    "openai without base_url (score)": (_openai("score", "detection"), "score.llm.base_url: required by the openai"),
    "openai without base_url (simulate)": (_openai("simulate", "llm"), "simulate.llm.base_url: required by the openai"),
    "openai base_url not a URL": ("simulate:\n  method: llm\n  llm: {backend: openai, model: m, base_url: localhost}\n",
                                  "simulate.llm.base_url: 'localhost' is not an http(s) URL"),
    "cuda without CUDA": ("execution: {device: cuda}\n", "execution.device is 'cuda' but this machine has no CUDA"),
    "llm on cuda without CUDA": ("explain:\n  method: llm\n  llm: {model: m, device: cuda}\n",
                                 "explain.llm.device is 'cuda' but this machine has no CUDA"),
    "vllm not installed": ("score:\n  method: detection\n  llm: {backend: vllm, model: m}\n",
                           "score.llm.backend is 'vllm' but vLLM is not installed"),
    "threads zero": ("execution: {threads: 0}\n", "execution.threads"),
    "corpus too small": ("corpus: {n_eval: 100000}\n", "too few for corpus.n_eval (100000)"),
    "checkpoint missing": ("transcoder: {checkpoint: /no/such/ckpt}\n",
                           "transcoder.checkpoint '/no/such/ckpt': no such directory"),
    "checkpoint without weights": (lambda p: f"transcoder: {{checkpoint: {_without_weights(p)}}}\n",
                                   "no sae.safetensors"),
    "checkpoint malformed": (lambda p: f"transcoder: {{checkpoint: {_garbage_checkpoint(p)}}}\n",
                             "its cfg.json is not a sparsify config"),
    "hf path malformed": ("transcoder: {checkpoint: 'hf://only-owner'}\n", "expected hf://<owner>/<repo>"),
    "hf path missing": ("transcoder: {checkpoint: 'hf://nlrewrite-test/no-such-repo/layers.0.mlp'}\n",
                        "cannot get its cfg.json from the Hugging Face hub or the local cache"),
    "checkpoint width": (lambda p: f"transcoder: {{checkpoint: {_checkpoint(p, 64, 128, 8)}}}\n",
                         "reads vectors of width 64 but the subject's hidden size is 32"),
    "checkpoint num_latents and k": (lambda p: f"transcoder: {{checkpoint: {_checkpoint(p, 32, 256, 4)}}}\n",
                                     "set transcoder.num_latents: 256 and transcoder.k: 4"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_refused_up_front(tmp_path, capsys, name):
    import torch

    text, expected = BAD_INPUTS[name]
    if "cuda" in name.lower() and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text(tmp_path) if callable(text) else text)
    storage = tmp_path / "store"
    code, err = run_cli(["run", "--preset", "micro", "--config", str(cfg), "--storage", str(storage)], capsys)
    assert code == 2, err
    assert expected in err and err.count("\n") == 1, err
    assert not storage.exists()


def test_checkpoint_matching_the_config_passes_the_checks(tmp_path):
    from nlrewrite_core.config import load_config
    from nlrewrite_core.runtime import check_run

    check_run(load_config("micro", overrides={"transcoder": {"checkpoint": _checkpoint(tmp_path, 32, 128, 8)}}))


def test_corpus_stage_refuses_a_built_corpus_too_small_before_writing(tmp_path):
    """A corpus that passes the up-front bound but holds too few sequences once built: ConfigError
    from the corpus stage, nothing written."""
    from nlrewrite_core import stages
    from nlrewrite_core.config import ConfigError, load_config
    from nlrewrite_core.runtime import check_run, max_sequences
    from nlrewrite_core.storage import Store

    cfg = load_config("micro", overrides={"corpus": {"n_explain": 5000}})
    assert max_sequences(cfg.corpus) > 5000 + 16 + 16 + 16
    check_run(cfg)  # the bound cannot tell
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match=r"too few for corpus.n_eval \(16\) \+ corpus.n_calib \(16\) \+ "
                                          r"corpus.n_explain \(5000\)"):
        stages.run("corpus", store, cfg, stages.plan(cfg))
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_execution_threads_is_applied():
    import torch

    from nlrewrite_core.config import load_config
    from nlrewrite_core.runtime import apply_threads

    n = torch.get_num_threads()
    try:
        apply_threads(load_config("micro", overrides={"execution": {"threads": 1 if n != 1 else 2}}))
        assert torch.get_num_threads() == (1 if n != 1 else 2)
    finally:
        torch.set_num_threads(n)


def test_config_error_inside_the_flow_exits_2(prefect_server, tmp_path, capsys):
    """A corpus that passes the up-front bound but is too small once built: the corpus stage's
    ConfigError ends `nlrewrite run` with exit 2 and the one line, no file written."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("corpus: {n_explain: 5000}\n")
    storage = tmp_path / "store"
    code, err = run_cli(["run", "--preset", "micro", "--config", str(cfg), "--storage", str(storage)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("nlrewrite: error: the corpus has ")
    assert "corpus.n_explain (5000)" in err.strip().splitlines()[-1]
    assert not [p for p in storage.rglob("*") if p.is_file()]


# ---- the run console, run records, `runs` and `report` ------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def cli_subprocess(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`nlrewrite ARGS` in its own process (its console is what a person sees), on the test server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def cli_run(prefect_server, tmp_path_factory):
    """`nlrewrite run --preset micro` once, cold, in a subprocess: (storage, run id, completed process)."""
    storage = tmp_path_factory.mktemp("cli-store")
    proc = cli_subprocess(["run", "--preset", "micro", "--storage", str(storage)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stderr.splitlines()[0].split()[2].rstrip(":")
    return storage, run_id, proc


def test_run_shows_stages_and_the_table_and_logs_prefect_to_the_file(cli_run):
    storage, run_id, proc = cli_run
    err, out = proc.stderr, proc.stdout
    stage_lines = [ln.split()[0] for ln in err.splitlines() if re.match(r"  \w+ +done +\d", ln)]
    assert stage_lines == ["corpus", "subject", "transcoder", "activations", "explain", "embed", "score", "simulate",
                           "calibrate", "evaluate", "report"]
    assert re.search(r"  simulate +done +\d+\.\d s  4 shards", err)  # one line for the shards, with a count
    assert re.search(r"  simulate +100% +4 / 4 shards", err)  # and their progress, a line per tenth
    assert re.search(r"  subject +100% +60 / 60 steps", err)  # not a terminal: a line per tenth of the steps
    assert "Task run" not in err + out and "Finished in state" not in err + out  # Prefect's lines: the log file
    assert "CE (nats) on the eval split" in out and "oracle crossing specificity: " in out
    assert not re.search(r"\d\.\d{5,}", out)  # rounded: no long floats, no raw dicts
    assert not re.search(r"\{'", out)
    run_dir = storage / "runs" / run_id  # the id the CLI computed is the flow's: one directory
    log = (run_dir / "log.txt").read_text()
    assert "Task run 'train_subject" in log and "Finished in state Completed()" in log
    assert (run_dir / "run.json").is_file()
    inv = json.loads((run_dir / "invocation.json").read_text())
    assert inv["outcome"] == "done" and inv["finished"] >= inv["started"] and inv["preset"] == "micro"


def test_warm_verbose_run_shows_cached_stages_and_prefect_lines(cli_run):
    storage, run_id, _ = cli_run
    proc = cli_subprocess(["run", "--preset", "micro", "--storage", str(storage), "--verbose"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"  simulate +cached +4 shards", proc.stderr)
    assert not re.search(r"  simulate +\d+%", proc.stderr)  # no progress to show when every shard is cached
    assert [ln.split()[0] for ln in proc.stderr.splitlines() if re.fullmatch(r"  \w+ +cached.*", ln)] == [
        "corpus", "subject", "transcoder", "activations", "explain", "embed", "score", "simulate", "calibrate",
        "evaluate", "report"]
    assert "Finished in state Cached" in proc.stderr  # Prefect's own lines, with --verbose
    log = (storage / "runs" / run_id / "log.txt").read_text()
    assert log.count(f"==== nlrewrite run {run_id}") == 4  # two runs appended, each started and ended


def test_runs_lists_finished_and_unfinished_and_names_a_damaged_record(cli_run, tmp_path, capsys):
    storage, run_id, _ = cli_run
    root = tmp_path / "root"
    shutil.copytree(storage / "runs" / run_id, root / "runs" / run_id)
    record = json.loads((storage / "runs" / run_id / "run.json").read_text())
    killed = root / "runs" / "killed"  # killed after the simulation: record without report, invocation running
    killed.mkdir(parents=True)
    (killed / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "report"} | {"run_id": "killed"}))
    (killed / "invocation.json").write_text(json.dumps({"run_id": "killed", "preset": "micro", "outcome": "running",
                                                        "started": "2026-01-01T00:00:00Z"}))
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "run.json").write_text('{"run_id": "broken", "preset": ')
    assert main(["runs", "--storage", str(root), "--format", "json"]) == 0
    cap = capsys.readouterr()
    rows = [json.loads(ln) for ln in cap.out.splitlines()]
    assert [r["run_id"] for r in rows] == ["killed", run_id]  # by start time
    assert rows[0] == {"run_id": "killed", "preset": "micro", "started": "2026-01-01T00:00:00Z",
                            "finished": "no (running or killed)", "report": ""}
    assert rows[1]["finished"].startswith("20") and rows[1]["report"] == record["report"]
    (line,) = cap.err.splitlines()
    assert line.startswith(f"nlrewrite: warning: {root}/runs/broken/run.json is damaged (")
    assert main(["runs", "--storage", str(root)]) == 0  # the table too
    assert "no (running or killed)" in capsys.readouterr().out


def test_report_prints_the_path_and_the_table_run_printed(cli_run, capsys):
    storage, run_id, proc = cli_run
    assert main(["report", run_id, "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    record = json.loads((storage / "runs" / run_id / "run.json").read_text())
    assert out.splitlines()[0] == f"report: {record['report']}"
    assert out.split("\n", 1)[1] == proc.stdout  # the same table and summary as `nlrewrite run` printed


def test_report_of_an_unfinished_or_unknown_run_exits_2(cli_run, tmp_path, capsys):
    storage, run_id, _ = cli_run
    record = json.loads((storage / "runs" / run_id / "run.json").read_text())
    (tmp_path / "runs" / "half").mkdir(parents=True)
    (tmp_path / "runs" / "half" / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "report"}))
    code, err = run_cli(["report", "half", "--storage", str(tmp_path)], capsys)
    assert code == 2 and "run 'half' has no report" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(["report", "nope", "--storage", str(tmp_path)], capsys)
    assert code == 2 and "run 'nope' not found" in err


def test_run_until_stops_after_the_stage(prefect_server, tmp_path, capsys):
    storage = tmp_path / "store"
    assert main(["run", "--preset", "micro", "--storage", str(storage), "--until", "embed"]) == 0
    cap = capsys.readouterr()
    shown = [ln.split()[0] for ln in cap.err.splitlines() if re.fullmatch(r"  \w+ +(done|cached).*", ln)]
    assert shown == ["corpus", "subject", "transcoder", "activations", "explain", "embed"]
    assert "stopped after embed (--until): stages corpus, subject, transcoder, activations, explain, embed" in cap.out
    assert "CE (nats)" not in cap.out
    assert not list((storage / "artifacts").glob("score/*"))
    (inv,) = (storage / "runs").glob("*/invocation.json")
    assert json.loads(inv.read_text())["outcome"] == "stopped after embed"


def test_until_takes_stage_names_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--until", "explainn"])
    assert e.value.code == 2 and "invalid choice: 'explainn'" in capsys.readouterr().err
    # a stage this config does not have: refused before anything runs or is written
    code, err = run_cli(["run", "--preset", "micro", "--storage", "/nonexistent/never", "--until", "multilayer"],
                        capsys)
    assert code == 2 and "--until: stage 'multilayer' is not part of this config's pipeline" in err
