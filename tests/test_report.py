"""Tests of the HTML report and its figures (nlrewrite_core.report)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nlrewrite_core.report import FIG1, FIG3, FIG4, aggregate_ce, baselines, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_ce() -> pd.DataFrame:
    """A small CE sweep: baselines, top and random (3 seeds) x two calibrations, all simulated."""
    rows = [
        ("clean", "all", math.nan, "", -1, 3.197, 3.10, 3.29, 100),
        ("transcoder", "all", math.nan, "", -1, 3.218, 3.12, 3.31, 100),
        ("zero_ablation", "all", math.nan, "", -1, 3.387, 3.29, 3.48, 100),
        ("mlp_ablation", "all", math.nan, "", -1, 3.9, 3.8, 4.0, 100),
    ]
    for calibration, scale in (("none", 1.0), ("quantile", 0.5)):
        for fraction in (0.01, 0.1, 1.0):
            base = 3.22 + scale * 4 * fraction
            rows.append(("simulated", "top", fraction, calibration, -1, base, base - 0.1, base + 0.1, 100))
            for seed in range(3):
                ce = base + 0.2 + 0.05 * seed
                rows.append(("simulated", "random", fraction, calibration, seed, ce, ce - 0.1, ce + 0.1, 100))
        rows.append(("simulated", "all", 1.0, calibration, -1, 3.22 + scale * 4, 7.0, 7.5, 100))
    return pd.DataFrame(
        rows,
        columns=["condition", "selection", "fraction", "calibration", "seed", "ce_mean", "ce_lo", "ce_hi", "n"],
    )


def synthetic_metrics(n: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frames = []
    for calibration in ("none", "quantile"):
        score = rng.uniform(0.5, 1.0, n)
        frames.append(
            pd.DataFrame(
                {
                    "latent": np.arange(n),
                    "detection_score": score,
                    "specificity": np.clip(score + rng.normal(0, 0.05, n), 0, 1),
                    "sensitivity": np.clip(1.2 - score + rng.normal(0, 0.05, n), 0, 1),
                    "calibration": calibration,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def synthetic_distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    true = rng.exponential(size=2000) * (rng.uniform(size=2000) < 0.05)
    return {"true": true, "raw": rng.uniform(0.2, 3.0, 2000), "quantile": np.sort(true)[rng.permutation(2000)]}


SUMMARY = {"FVU": 0.123456, "CE recovered": 0.87, "mean detection score": 0.71, "active_threshold": 0.5}


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 2000


def test_write_report_writes_html_and_figures(tmp_path: Path) -> None:
    out = write_report(tmp_path / "rep", synthetic_ce(), synthetic_metrics(), synthetic_distributions(), SUMMARY)
    assert out == tmp_path / "rep" / "report.html"
    page = out.read_text(encoding="utf-8")
    for name in (FIG1, FIG3, FIG4):
        assert_png(out.parent / name)
        assert f"src='{name}'" in page  # relative reference
    assert len(set(re.findall(r"src='([^']+\.png)'", page))) == 3
    # The CE table: one row per CE row plus the header, with the paper's baseline values.
    table = page[page.index("<table", page.index("Cross-entropy")) :]
    table = table[: table.index("</table>")]
    assert "ce" in table[: table.index(">")]
    assert table.count("<tr") == len(synthetic_ce()) + 1
    for text in ("clean", "transcoder", "zero_ablation", "3.197", "quantile", "random"):
        assert text in table
    # Summary and the stated threshold.
    assert "FVU" in page and "0.1235" in page
    assert "active_threshold = 0.5" in page
    assert page.count("<figcaption>") == 3


def test_report_escapes_text(tmp_path: Path) -> None:
    ce = synthetic_ce()
    ce.loc[ce["calibration"] == "none", "calibration"] = "<b>none</b>"
    summary = {"title": "run <script>alert(1)</script>", "note & more": "<i>x</i>", "active_threshold": 0.5}
    page = write_report(tmp_path, ce, synthetic_metrics(), synthetic_distributions(), summary).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<i>x</i>" not in page and "note &amp; more" in page
    assert "<b>none</b>" not in page and "&lt;b&gt;none&lt;/b&gt;" in page


@pytest.mark.parametrize(
    "ce, metrics, dists, summary",
    [
        (pd.DataFrame(), pd.DataFrame(), {}, {}),
        (None, None, None, None),
        (pd.DataFrame({"condition": ["clean"]}), pd.DataFrame({"latent": [1]}), {"true": np.array([np.nan])}, {}),
        (
            synthetic_ce()[lambda d: d["condition"] != "simulated"],
            synthetic_metrics().assign(specificity=np.nan),
            {"true": np.zeros(10)},
            {"active_threshold": 0.1},
        ),
        (synthetic_ce()[lambda d: d["condition"] == "simulated"], synthetic_metrics(3), {"raw": np.ones(5)}, {}),
    ],
)
def test_report_survives_empty_or_partial_inputs(tmp_path: Path, ce, metrics, dists, summary) -> None:
    page = write_report(tmp_path, ce, metrics, dists, summary).read_text()
    for name in (FIG1, FIG3, FIG4):
        assert_png(tmp_path / name)
        assert name in page
    if "active_threshold" not in (summary or {}):
        assert "No specificity threshold" in page


def test_aggregate_ce_random_uses_seed_spread_and_top_its_interval() -> None:
    agg = aggregate_ce(synthetic_ce())
    rand = agg[(agg["selection"] == "random") & (agg["calibration"] == "none") & (agg["fraction"] == 0.1)].iloc[0]
    seeds = 3.22 + 0.4 + 0.2 + 0.05 * np.arange(3)
    assert rand["ce_mean"] == pytest.approx(seeds.mean())
    assert (rand["ce_lo"], rand["ce_hi"]) == pytest.approx((seeds.min(), seeds.max()))
    assert rand["n_seeds"] == 3
    top = agg[(agg["selection"] == "top") & (agg["calibration"] == "quantile") & (agg["fraction"] == 0.01)].iloc[0]
    assert (top["ce_lo"], top["ce_mean"], top["ce_hi"]) == pytest.approx((3.22 + 0.02 - 0.1, 3.24, 3.24 + 0.1))
    assert set(agg["selection"]) == {"top", "random", "all"}
    assert baselines(synthetic_ce()) == pytest.approx(
        {"clean": 3.197, "transcoder": 3.218, "zero_ablation": 3.387, "mlp_ablation": 3.9}
    )
