"""The CLI contract: bad input exits 2 with one message naming the field or file, writing nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlrewrite_core.cli import main


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
    from nlrewrite_core.cli import headline_rows

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
