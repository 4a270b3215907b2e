"""The run report: ``report.html`` with PNG figures beside it.

Figures (numbered as in the paper):

- Figure 1, ``fig1_distributions.png``: true vs predicted activation distributions, before
  (raw) and after each calibration method.
- Figure 3, ``fig3_ce_vs_fraction.png``: one panel per calibration method (shared y axis): CE
  minus zero-ablation CE (paired intervals) against the fraction of latents simulated, top vs
  random selection, the strict all-simulated point, and zero-ablation, transcoder and clean as
  named horizontal lines.
- Figure 4, ``fig4_specificity_sensitivity.png``: per-latent specificity and sensitivity
  against the detection score, per calibration method, with binned means and the rank
  correlation, and the activity threshold of each method stated.
- ``fig_calibration_comparison.png``: CE at fractions 0.1 and 1.0 (top selection) and mean
  specificity / sensitivity / AUROC for each calibration method.
- ``fig_oracle_specificity.png``: the oracle (true activations with injected false positives
  and negatives): CE against specificity, with zero-ablation and the crossing marked.
- Figure A2, ``figA2_sample_size.png``: CE and specificity/sensitivity against the number of
  calib contexts the calibration maps were fit on.
- ``fig_examples.png``: a few example latents, true against predicted activation.

Every figure states the run, the split and n, and which explainer, scorer and simulator produced it
(in the figure and its caption). The headline table
repeats rows of the ``ce`` table (4 decimals) for the primary positions.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display,
no network). Missing or empty inputs give a figure that says so instead of an error. All text
put into the HTML is escaped; images are referenced by relative path.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

FIG1 = "fig1_distributions.png"
FIG3 = "fig3_ce_vs_fraction.png"
FIG4 = "fig4_specificity_sensitivity.png"
FIG_CALIB = "fig_calibration_comparison.png"
FIG_ORACLE = "fig_oracle_specificity.png"
FIGA2 = "figA2_sample_size.png"
FIG_EXAMPLES = "fig_examples.png"
ALL_FIGURES = (FIG1, FIG3, FIG4, FIG_CALIB, FIG_ORACLE, FIGA2, FIG_EXAMPLES)
HEADLINE_FRACTIONS = (0.1, 1.0)

CE_COLUMNS = ["condition", "selection", "fraction", "calibration", "seed", "positions", "ce_mean", "ce_lo", "ce_hi",
              "n"]
METRIC_COLUMNS = ["latent", "detection_score", "specificity", "sensitivity", "calibration"]
BASELINE_STYLE = {
    "clean": ("black", "-"),
    "transcoder": ("tab:green", "--"),
    "zero_ablation": ("tab:red", ":"),
    "mlp_ablation": ("tab:purple", "-."),
    "mean_ablation": ("tab:brown", (0, (5, 2, 1, 2))),
}
SELECTION_STYLE = {"top": ("-", "o"), "random": ("--", "s"), "all": ("none", "*")}
SELECTION_COLOR = {"top": "tab:blue", "random": "tab:orange"}  # Figure 3's two selections
SELECTION_LABEL = {"top": "top by detection score", "random": "random"}
STRICT_LABEL = "strict: all latents simulated, none keeps its true value (bar: paired 95% CI)"
REFERENCE_LABEL = {"zero_ablation": "zero-ablation", "transcoder": "transcoder", "clean": "clean"}
DPI = 110


# ---------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------


def _has_columns(frame: pd.DataFrame | None, columns: list[str]) -> TypeGuard[pd.DataFrame]:
    """Whether ``frame`` is a non-empty DataFrame holding ``columns``."""
    return isinstance(frame, pd.DataFrame) and not frame.empty and set(columns) <= set(frame.columns)


def aggregate_ce(ce: pd.DataFrame | None, value: str = "ce", condition: str = "simulated") -> pd.DataFrame:
    """Rows of ``condition`` as one point per (selection, calibration, fraction) of ``value``
    (``ce``: the CE; ``delta_zero``: its paired difference against zero-ablation).

    Columns: selection, calibration, fraction, {value}_mean, {value}_lo, {value}_hi, n_seeds. Over
    several seeds (random selection) the point is the mean over seeds and the interval the seeds'
    min-max spread; a single row keeps its own (bootstrap) interval. Rows of the ``all`` selection
    with no fraction are placed at fraction 1.
    """
    mean_col, lo_col, hi_col = f"{value}_mean", f"{value}_lo", f"{value}_hi"
    out_cols = ["selection", "calibration", "fraction", mean_col, lo_col, hi_col, "n_seeds"]
    needed = ["condition", "selection", "fraction", "calibration", mean_col]
    if not _has_columns(ce, needed):
        return pd.DataFrame(columns=out_cols)
    sim = ce[ce["condition"] == condition].copy()
    sim["fraction"] = pd.to_numeric(sim["fraction"], errors="coerce")
    sim.loc[sim["fraction"].isna() & (sim["selection"] == "all"), "fraction"] = 1.0
    sim = sim[np.isfinite(sim["fraction"]) & np.isfinite(pd.to_numeric(sim[mean_col], errors="coerce"))]
    for col in (lo_col, hi_col):
        if col not in sim.columns:
            sim[col] = np.nan
    rows = []
    for (selection, calibration, fraction), group in sim.groupby(
        ["selection", "calibration", "fraction"], sort=True, dropna=False
    ):
        means = group[mean_col].to_numpy(dtype=float)
        if len(group) > 1:
            lo, hi = float(means.min()), float(means.max())
        else:
            lo, hi = float(group[lo_col].iloc[0]), float(group[hi_col].iloc[0])
        rows.append((selection, calibration, float(fraction), float(means.mean()), lo, hi, len(group)))
    return pd.DataFrame(rows, columns=out_cols)


def baselines(ce: pd.DataFrame | None, column: str = "ce_mean") -> dict[str, float]:
    """Mean ``column`` (the CE; or ``delta_zero_mean``) of each non-simulated condition (clean,
    transcoder, ablations): name -> mean."""
    if not _has_columns(ce, ["condition", column]):
        return {}
    rows = ce[~ce["condition"].astype(str).str.startswith("simulated")]
    means = pd.to_numeric(rows[column], errors="coerce").groupby(rows["condition"], sort=True).mean()
    return {str(name): float(mean) for name, mean in means.items() if np.isfinite(mean)}


def _finite(values: Any) -> np.ndarray:
    """``values`` as a flat float array without NaN or inf (empty for None)."""
    if values is None:
        return np.zeros(0)
    arr = np.asarray(values, dtype=float).ravel()
    return arr[np.isfinite(arr)]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _note(ax: Axes, text: str) -> None:
    """Write ``text`` in the middle of an empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _renderer(fig: Figure) -> Any:
    """The renderer of ``fig``'s Agg canvas (to measure text and legends before saving)."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    return canvas.get_renderer()


def _save(fig: Figure, path: Path, stamp: str | None = None) -> None:
    """Save ``fig`` as PNG at ``path``; ``stamp`` (run, split, n; the methods) is written along the bottom,
    and figure-level legends (``fig.legend(loc="lower center")``) are stacked above it, outside the axes."""
    bottom = 0.0
    if stamp:
        # Wrapped to the figure's width (about 15 characters of 7-point text per inch).
        stamp = "\n".join(textwrap.fill(line, int(fig.get_figwidth() * 15), break_long_words=False)
                          for line in stamp.split("\n"))
        bottom = 0.01 + 0.11 * (stamp.count("\n") + 1) / fig.get_figheight()
    renderer = _renderer(fig)
    for legend in fig.legends:
        legend.set_bbox_to_anchor((0.5, bottom), transform=fig.transFigure)
        bottom += legend.get_window_extent(renderer).height / fig.bbox.height
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if stamp:
        fig.text(0.01, 0.01, stamp, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.savefig(path, format="png")


def pipeline_methods(cfg: Any) -> dict[str, str]:
    """Which explainer, scorer and simulator produced a run's numbers, from its config (a RewriteConfig):
    the method, with the model behind it when there is one."""
    def named(method: str, llm: Any) -> str:
        if method == "embedding":
            return f"embedding ({cfg.embedding.model})"
        return f"{method} ({llm.model})" if llm is not None else method

    return {"explainer": named(cfg.explain.method, cfg.explain.llm),
            "scorer": named(cfg.score.method, cfg.score.llm),
            "simulator": named(cfg.simulate.method, cfg.simulate.llm)}


def methods_text(methods: Mapping[str, str] | None) -> str:
    """The line "explainer X · scorer Y · simulator Z" (empty when the methods are not known)."""
    known = methods or {}
    return " · ".join(f"{role} {known[role]}" for role in ("explainer", "scorer", "simulator") if role in known)


def stamp_text(meta: Mapping[str, Any] | None, split: str, n: str) -> str:
    """The lines that state a figure's run, split and n, then (when meta has them) its explainer,
    scorer and simulator."""
    run = (meta or {}).get("run", "unknown run")
    methods = methods_text((meta or {}).get("methods"))
    return f"run {run} · {split} split · n = {n}" + (f"\n{methods}" if methods else "")


def _spread_labels(values: list[float], gap: float) -> list[float]:
    """Heights for labels of ``values``: the first stays at its value, the others are moved away from it
    (up above it, down below it) where needed so that no two are closer than ``gap``."""
    out = list(values)
    anchor = values[0]
    for side in (1.0, -1.0):
        last = anchor
        for i in sorted((i for i in range(1, len(values)) if (values[i] - anchor) * side >= 0),
                        key=lambda i: (values[i] - anchor) * side):
            out[i] = side * max(side * values[i], side * last + gap)
            last = out[i]
    return out


def _label_lines(ax: Axes, lines: Mapping[str, float], labels: Mapping[str, str]) -> None:
    """Name the horizontal reference ``lines`` (name -> y) in the margin right of ``ax``, in their colours."""
    y0, y1 = ax.get_ylim()
    names = list(lines)
    heights = _spread_labels([lines[n] for n in names], 0.075 * (y1 - y0))
    transform = ax.get_yaxis_transform()  # x in axes coordinates, y in data
    for name, y in zip(names, heights):
        value = "0" if lines[name] == 0 else f"{lines[name]:+.3f}"
        ax.text(1.03, y, f"{labels[name]} {value}", transform=transform, ha="left", va="center",
                fontsize=8, color=BASELINE_STYLE[name][0], clip_on=False)


def plot_ce_sweep(ce: pd.DataFrame | None, path: Path, stamp: str | None = None) -> None:
    """Figure 3 as small multiples, one panel per calibration method (shared y axis): CE minus
    zero-ablation CE (``delta_zero``, paired on the same sequences) against the fraction of latents
    simulated (log x), for the top latents by detection score (band: the paired 95% interval) and
    random latents (mean over seeds; band: the seeds' min-max, or one seed's paired interval), the
    strict all-simulated point at fraction 1, and reference lines for zero-ablation (0), the
    transcoder and, when it fits the scale, the clean model, named in the right margin. ``ce``: the
    rows of the primary positions."""
    points = aggregate_ce(ce, "delta_zero")
    points = points[points["selection"].isin(list(SELECTION_COLOR)) & (points["fraction"] > 0)]
    points = points.assign(calibration=points["calibration"].astype(str))
    strict = aggregate_ce(ce, "delta_zero", condition="simulated_strict")
    strict = strict.assign(calibration=strict["calibration"].astype(str))
    present = set(points["calibration"]) | set(strict["calibration"])
    order = ce["calibration"].astype(str) if isinstance(ce, pd.DataFrame) and present else []
    methods = [m for m in dict.fromkeys(order) if m in present]  # in the table's (the config's) order
    if not methods:
        fig = _new_figure(7.5, 4.0)
        _note(fig.add_subplot(), "No CE results (against zero-ablation).")
        _save(fig, path, stamp)
        return
    cols = ["delta_zero_mean", "delta_zero_lo", "delta_zero_hi"]
    lines = {k: v for k, v in baselines(ce, "delta_zero_mean").items() if k in ("transcoder", "clean")}
    core = np.concatenate([points[cols].to_numpy(float).ravel(), strict[cols].to_numpy(float).ravel(),
                           [0.0, lines.get("transcoder", 0.0)]])
    low, high = float(np.nanmin(core)), float(np.nanmax(core))
    span = max(high - low, 1e-3)
    if "clean" in lines and not low - 0.25 * span <= lines["clean"] <= high + 0.25 * span:
        del lines["clean"]  # far off the data's scale: stated in the caption instead
    lines = {"zero_ablation": 0.0, **lines}
    low, high = min(low, *lines.values()), max(high, *lines.values())
    pad = 0.08 * max(high - low, 1e-3)
    x_min = float(points["fraction"].min()) if not points.empty else 0.1

    n_cols = min(len(methods), 3)
    n_rows = math.ceil(len(methods) / n_cols)
    fig = _new_figure(3.4 * n_cols + 1.6, 2.9 * n_rows + 1.2)
    grid = fig.subplots(n_rows, n_cols, sharey=True, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(methods):]:
        fig.delaxes(ax)
    handles: dict[str, Any] = {}
    for i, (ax, method) in enumerate(zip(axes, methods)):
        for selection, color in SELECTION_COLOR.items():
            group = points[(points["calibration"] == method) & (points["selection"] == selection)]
            if group.empty:
                continue
            group = group.sort_values("fraction")
            x = group["fraction"].to_numpy(float)
            y, lo, hi = (group[c].to_numpy(float) for c in cols)
            ax.fill_between(x, np.where(np.isfinite(lo), lo, y), np.where(np.isfinite(hi), hi, y),
                            color=color, alpha=0.22, linewidth=0)
            seeds = int(group["n_seeds"].max())
            if selection == "random" and seeds > 1:
                label = f"random, mean over {seeds} seeds (band: seeds' min-max)"
            else:
                label = f"{SELECTION_LABEL[selection]} (band: paired 95% CI)"
            handles[label] = ax.plot(x, y, color=color, marker=SELECTION_STYLE[selection][1], markersize=4,
                                     linewidth=1.8, label=label)[0]
        point = strict[strict["calibration"] == method]
        if not point.empty:
            y, lo, hi = (point[c].to_numpy(float) for c in cols)
            yerr = np.vstack([np.nan_to_num(y - lo, nan=0.0), np.nan_to_num(hi - y, nan=0.0)]).clip(min=0)
            handles[STRICT_LABEL] = ax.errorbar(np.ones(len(y)), y, yerr=yerr, fmt="D", markersize=9,
                                                markerfacecolor="none", markeredgecolor="black", ecolor="black",
                                                markeredgewidth=1.4, capsize=4, zorder=5, label=STRICT_LABEL)
        for name, y in lines.items():
            color, style = BASELINE_STYLE[name]
            ax.axhline(y, color=color, linestyle=style, linewidth=1.2, zorder=1)
        ax.set_xscale("log")
        ax.set_xlim(x_min / 1.6, 1.6)
        ax.set_ylim(low - pad, high + pad)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:g}%"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(f"calibration: {method}", fontsize=10)
        ax.set_xlabel("fraction of latents simulated (log)", fontsize=9)
        if i % n_cols == 0:
            ax.set_ylabel("CE \u2212 zero-ablation CE (nats)\nbelow 0: better than zeroing", fontsize=9)
        if i % n_cols == n_cols - 1 or i == len(methods) - 1:
            _label_lines(ax, lines, REFERENCE_LABEL)
    for n_legend_cols in (len(handles), 1):  # one row when it fits the width, else one column
        legend = fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=n_legend_cols,
                            fontsize=8, frameon=False)
        if legend.get_window_extent(_renderer(fig)).width <= 0.98 * fig.bbox.width:
            break
        legend.remove()
    _save(fig, path, stamp)


def _histogram(ax: Axes, named: dict[str, np.ndarray], bins: np.ndarray, title: str) -> None:
    """Step histograms (log y) of ``named`` arrays on shared bins."""
    for i, (name, values) in enumerate(named.items()):
        zero = float(np.mean(values == 0)) if values.size else math.nan
        label = f"{name} (n={values.size}, {zero:.1%} zero)"
        style: dict[str, Any] = {"color": "black", "linewidth": 2.4, "alpha": 0.45} if name == "true" else {
            "color": f"C{i % 10}", "linewidth": 1.3}
        # matplotlib's stub types bins as Sequence[float]; hist takes any array-like (documented)
        ax.hist(values, bins=bins, histtype="step", label=label, **style)  # type: ignore[arg-type]
    ax.set_yscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_distributions(distributions: Mapping[str, Any] | None, path: Path, stamp: str | None = None) -> None:
    """Figure 1: true vs raw predictions (left) and true vs calibrated predictions (right)."""
    fig = _new_figure(10.0, 4.0)
    left, right = fig.subplots(1, 2)
    arrays = {str(k): _finite(v) for k, v in (distributions or {}).items()}
    arrays = {k: v for k, v in arrays.items() if v.size}
    if not arrays:
        _note(left, "No activation samples.")
        _note(right, "No activation samples.")
        _save(fig, path, stamp)
        return
    everything = np.concatenate(list(arrays.values()))
    lo, hi = float(everything.min()), float(everything.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    true = {"true": arrays["true"]} if "true" in arrays else {}
    # calibration `none` is the simulator's raw predictions: one name for it, config to legend
    before = {**true, **({"none": arrays["none"]} if "none" in arrays else {})}
    after = {**true, **{k: v for k, v in arrays.items() if k not in ("true", "none")}}
    if len(before) > len(true):
        _histogram(left, before, bins, "before calibration (calibration none)")
    else:
        _note(left, "No predictions of calibration none.")
    if len(after) > len(true):
        _histogram(right, after, bins, "after calibration")
    else:
        _note(right, "No calibrated predictions.")
    _save(fig, path, stamp)


def plot_specificity_sensitivity(
    latent_metrics: pd.DataFrame | None, path: Path, threshold: Any = None,
    relation: pd.DataFrame | None = None, stamp: str | None = None,
) -> None:
    """Figure 4: per-latent specificity and sensitivity against detection score, per calibration,
    with the binned means (lines) and Spearman rho of ``relation`` (the ``score_relation`` table)."""
    fig = _new_figure(11.0, 4.6)
    axes = fig.subplots(1, 2)
    if not _has_columns(latent_metrics, METRIC_COLUMNS):
        for ax in axes:
            _note(ax, "No per-latent metrics.")
        _save(fig, path, stamp)
        return
    suffix = f" (active if prediction > {threshold})" if threshold is not None else ""
    rules = {}
    if "threshold_rule" in latent_metrics.columns:
        rules = latent_metrics.groupby("calibration")["threshold_rule"].first().astype(str).to_dict()
        suffix = ""
    rel_table = relation if _has_columns(relation, ["calibration", "metric", "score_mean", "mean", "rho"]) else None
    for ax, metric in zip(axes, ("specificity", "sensitivity")):
        frame = pd.DataFrame({
            "detection_score": pd.to_numeric(latent_metrics["detection_score"], errors="coerce"),
            metric: pd.to_numeric(latent_metrics[metric], errors="coerce"),
            "calibration": latent_metrics["calibration"].astype(str),
        })
        frame = frame[np.isfinite(frame["detection_score"]) & np.isfinite(frame[metric])]
        if frame.empty:
            _note(ax, f"No finite {metric} values.")
            continue
        for i, (calibration, group) in enumerate(frame.groupby("calibration", sort=True)):
            label = f"{calibration} (mean {group[metric].mean():.3f}"
            if rel_table is not None:
                rel = rel_table[(rel_table["calibration"] == calibration) & (rel_table["metric"] == metric)]
                if not rel.empty:
                    rel = rel.sort_values("score_mean")
                    ax.plot(rel["score_mean"], rel["mean"], color=f"C{i % 10}", linewidth=1.6)
                    label += f", rho {float(rel['rho'].iloc[0]):.2f}"
            if calibration in rules:
                label += f"; active: {rules[calibration]}"
            ax.scatter(group["detection_score"], group[metric], s=6, alpha=0.35, color=f"C{i % 10}",
                       label=label + ")")
        ax.set_xlabel("detection score (balanced accuracy)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{metric} vs detection score{suffix} (lines: binned means)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, markerscale=2)
    _save(fig, path, stamp)


def calibration_comparison(ce: pd.DataFrame | None, latent_metrics: pd.DataFrame | None) -> pd.DataFrame:
    """One row per calibration method: CE (top selection) at the headline fractions with intervals,
    and mean per-latent specificity, sensitivity, precision, Spearman and AUROC, with the stated
    activity threshold."""
    out: dict[str, dict[str, Any]] = {}
    if _has_columns(ce, ["condition", "selection", "fraction", "calibration", "ce_mean"]):
        sim = ce[(ce["condition"] == "simulated") & (ce["selection"] == "top")]
        for _, r in sim.iterrows():
            frac = float(r["fraction"])
            if not any(math.isclose(frac, f) for f in HEADLINE_FRACTIONS):
                continue
            row = out.setdefault(str(r["calibration"]), {"calibration": str(r["calibration"])})
            row[f"ce@{frac:g}"] = float(r["ce_mean"])
            row[f"ce@{frac:g} lo"] = float(r.get("ce_lo", np.nan))
            row[f"ce@{frac:g} hi"] = float(r.get("ce_hi", np.nan))
    if _has_columns(latent_metrics, ["calibration"]):
        for cal, group in latent_metrics.groupby("calibration", sort=True):
            row = out.setdefault(str(cal), {"calibration": str(cal)})
            for col in ("specificity", "sensitivity", "precision", "spearman", "auroc"):
                if col in group:
                    row[col] = float(pd.to_numeric(group[col], errors="coerce").mean())
            if "threshold_rule" in group:
                row["active if"] = str(group["threshold_rule"].iloc[0])
    return pd.DataFrame(list(out.values()))


def plot_calibration_comparison(comparison: pd.DataFrame | None, path: Path, zero: float | None = None,
                                stamp: str | None = None) -> None:
    """CE at the headline fractions (left) and mean activity metrics (right) per calibration method."""
    fig = _new_figure(11.0, 4.4)
    left, right = fig.subplots(1, 2)
    if comparison is None or comparison.empty:
        _note(left, "No calibration results.")
        _note(right, "No calibration results.")
        _save(fig, path, stamp)
        return
    methods = comparison["calibration"].astype(str).tolist()
    xs = np.arange(len(methods))
    drawn = False
    for i, frac in enumerate(HEADLINE_FRACTIONS):
        col = f"ce@{frac:g}"
        if col not in comparison:
            continue
        y = comparison[col].to_numpy(float)
        lo = np.nan_to_num(y - comparison[f"{col} lo"].to_numpy(float), nan=0.0).clip(min=0)
        hi = np.nan_to_num(comparison[f"{col} hi"].to_numpy(float) - y, nan=0.0).clip(min=0)
        left.errorbar(xs + (i - 0.5) * 0.2, y, yerr=np.vstack([lo, hi]), fmt="o", capsize=3,
                      label=f"top {frac:g} of latents simulated")
        drawn = drawn or bool(np.isfinite(y).any())
    if drawn:
        if zero is not None and np.isfinite(zero):
            left.axhline(zero, color="tab:red", linestyle=":", label=f"zero_ablation ({zero:.3f})")
        left.set_xticks(xs, methods, rotation=30, fontsize=8)
        left.set_ylabel("next-token CE (nats)")
        left.set_title("CE per calibration method (bootstrap 95%)", fontsize=9)
        left.grid(True, alpha=0.3)
        left.legend(fontsize=7)
    else:
        _note(left, "No CE at the headline fractions.")
    metrics = [m for m in ("specificity", "sensitivity", "auroc") if m in comparison]
    if metrics:
        width = 0.8 / len(metrics)
        for i, m in enumerate(metrics):
            right.bar(xs + (i - (len(metrics) - 1) / 2) * width, comparison[m].to_numpy(float), width, label=m)
        right.set_xticks(xs, methods, rotation=30, fontsize=8)
        right.set_ylim(0, 1.05)
        right.set_title("mean per-latent metrics (thresholds in the table)", fontsize=9)
        right.grid(True, axis="y", alpha=0.3)
        right.legend(fontsize=7)
    else:
        _note(right, "No per-latent metrics.")
    _save(fig, path, stamp)


def plot_oracle(oracle: pd.DataFrame | None, path: Path, lines: Mapping[str, float] | None = None,
                stamp: str | None = None) -> None:
    """CE of the oracle (true activations with injected errors) against specificity, one line per
    false-negative rate; zero-ablation and the transcoder as horizontal lines."""
    fig = _new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    if not _has_columns(oracle, ["fp_rate", "fn_rate", "specificity", "ce_mean"]):
        _note(ax, "No oracle results.")
        _save(fig, path, stamp)
        return
    for i, (fn_rate, group) in enumerate(oracle.groupby("fn_rate", sort=True)):
        group = group.sort_values("specificity", ascending=False)
        x = 1.0 - group["specificity"].to_numpy(float)
        y = group["ce_mean"].to_numpy(float)
        err = None
        if {"ce_lo", "ce_hi"} <= set(group.columns):
            err = np.vstack([np.nan_to_num(y - group["ce_lo"].to_numpy(float)).clip(min=0),
                             np.nan_to_num(group["ce_hi"].to_numpy(float) - y).clip(min=0)])
        sens = group["sensitivity"].mean() if "sensitivity" in group else 1 - fn_rate
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2, color=f"C{i % 10}",
                    label=f"false-negative rate {fn_rate:g} (sensitivity {sens:.2f})")
    for name, value in (lines or {}).items():
        color, style = BASELINE_STYLE.get(name, ("0.5", "-"))
        ax.axhline(value, color=color, linestyle=style, linewidth=1.2, label=f"{name} ({value:.3f})")
    ax.axvspan(1e-4, 1e-2, color="0.9", zorder=0, label="specificity 99%-99.99%")
    ax.set_xscale("symlog", linthresh=1e-5)
    ax.set_xlim(left=0)
    ax.set_xlabel("1 - specificity (false-positive rate among truly inactive (context, latent) pairs)")
    ax.set_ylabel("next-token CE (nats)")
    ax.set_title("Oracle: how specific must simulated activity be?", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path, stamp)


def plot_sample_size(sizes: pd.DataFrame | None, path: Path, zero: float | None = None,
                     stamp: str | None = None) -> None:
    """Figure A2: CE (left) and mean specificity/sensitivity (right) against calib contexts used."""
    fig = _new_figure(11.0, 4.4)
    left, right = fig.subplots(1, 2)
    if not _has_columns(sizes, ["calibration", "n_calib_contexts", "fraction", "ce_mean"]):
        _note(left, "No sample-size ablation.")
        _note(right, "No sample-size ablation.")
        _save(fig, path, stamp)
        return
    methods = sorted(sizes["calibration"].astype(str).unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    # Two ablations (the `varied` column): calib predictions (x: calib contexts, the true sample
    # fixed; solid markers) and the true sample (x: its tokens, calib fixed; hollow markers).
    thr = sizes["threshold"].iloc[0] if "threshold" in sizes else None
    if "varied" in sizes:
        true_sizes = sizes[sizes["varied"] == "true_sample"]
        sizes = sizes[sizes["varied"] != "true_sample"]
    else:
        true_sizes = sizes.iloc[0:0]
    for j, (frac, fgroup) in enumerate(sizes.groupby("fraction", sort=True)):
        for m, group in fgroup.groupby("calibration", sort=True):
            group = group.sort_values("n_calib_contexts")
            y = group["ce_mean"].to_numpy(float)
            err = np.vstack([np.nan_to_num(y - group["ce_lo"].to_numpy(float)).clip(min=0),
                             np.nan_to_num(group["ce_hi"].to_numpy(float) - y).clip(min=0)])
            left.errorbar(group["n_calib_contexts"], y, yerr=err, marker="o", markersize=4, capsize=2,
                          color=colors[str(m)], linestyle=styles[j % len(styles)], label=f"{m}, top {frac:g}")
    for j, (frac, fgroup) in enumerate(true_sizes.groupby("fraction", sort=True)):
        for m, group in fgroup.groupby("calibration", sort=True):
            group = group.sort_values("n_true_tokens")
            left.plot(group["n_true_tokens"], group["ce_mean"].to_numpy(float), marker="s", markersize=5,
                      markerfacecolor="none", color=colors[str(m)], linestyle=styles[(j + 1) % len(styles)],
                      label=f"{m}, top {frac:g}: x = true-sample tokens")
    if zero is not None and np.isfinite(zero):
        left.axhline(zero, color="tab:red", linestyle=":", label=f"zero_ablation ({zero:.3f})")
    left.set_xscale("log")
    left.set_xlabel("calib contexts the maps were fit on (hollow: true-sample tokens mapped onto)")
    left.set_ylabel("next-token CE (nats)")
    left.set_title("CE vs calibration sample size", fontsize=9)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=6)
    first = sizes.drop_duplicates(["calibration", "n_calib_contexts"])
    for m, group in first.groupby("calibration", sort=True):
        group = group.sort_values("n_calib_contexts")
        for metric, style in (("specificity", "-"), ("sensitivity", "--")):
            if metric in group:
                right.plot(group["n_calib_contexts"], group[metric], marker="o", markersize=4, linestyle=style,
                           color=colors[str(m)], label=f"{m} {metric}")
    right.set_xscale("log")
    right.set_ylim(-0.03, 1.03)
    right.set_xlabel("calib contexts the maps were fit on")
    right.set_ylabel("mean per-latent metric")
    right.set_title(f"specificity / sensitivity (active if calibrated > {thr})", fontsize=9)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=6)
    _save(fig, path, stamp)


def plot_examples(examples: Sequence[Mapping[str, Any]] | None, path: Path, stamp: str | None = None) -> None:
    """Example latents: predicted (raw and calibrated) against true activation on eval contexts.

    Each example is a mapping with latent, score, true (array) and preds ({method: array})."""
    examples = list(examples or [])
    n = max(len(examples), 1)
    fig = _new_figure(3.3 * n, 3.6)
    axes = np.atleast_1d(fig.subplots(1, n))
    if not examples:
        _note(axes[0], "No example latents.")
        _save(fig, path, stamp)
        return
    for ax, ex in zip(axes, examples):
        true = np.asarray(ex.get("true", []), dtype=float)
        for i, (method, pred) in enumerate((ex.get("preds") or {}).items()):
            pred = np.asarray(pred, dtype=float)
            ax.scatter(true, pred, s=5, alpha=0.4, color=f"C{i % 10}", label=str(method))
        hi = float(np.nanmax(true)) if true.size and np.isfinite(true).any() else 1.0
        ax.plot([0, hi], [0, hi], color="0.5", linewidth=0.8, linestyle=":")
        score = ex.get("score")
        score_text = f"{score:.2f}" if isinstance(score, (float, int)) and np.isfinite(score) else "n/a"
        ax.set_title(f"latent {ex.get('latent')} (detection {score_text})", fontsize=8)
        ax.set_xlabel("true activation", fontsize=8)
        ax.set_ylabel("predicted activation", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, markerscale=2)
    _save(fig, path, stamp)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """A summary value as display text."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def summary_html(summary: Mapping[str, Any]) -> str:
    """The summary dict as an HTML table (escaped)."""
    if not summary:
        return "<p class='note'>No summary values.</p>"
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format_value(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"<table class='summary'>{rows}</table>"


def frame_html(frame: pd.DataFrame | None, css_class: str, empty: str) -> str:
    """A DataFrame as an escaped HTML table, or ``empty`` as a note."""
    if frame is None or frame.empty:
        return f"<p class='note'>{html.escape(empty)}</p>"
    return frame.to_html(
        index=False, escape=True, na_rep="", border=0, classes=css_class,
        float_format=lambda v: f"{v:.4g}",
    )


def _sorted_ce(ce: pd.DataFrame | None) -> pd.DataFrame | None:
    """The CE table in display order: baselines first, then by selection, calibration, fraction."""
    if not isinstance(ce, pd.DataFrame) or ce.empty:
        return None
    cols = [c for c in CE_COLUMNS if c in ce.columns] + [c for c in ce.columns if c not in CE_COLUMNS]
    frame = ce[cols].copy()
    keys = [c for c in ("positions", "condition", "selection", "calibration", "fraction", "seed") if c in frame]
    if "condition" in frame:
        frame["_sim"] = frame["condition"] == "simulated"
        keys = ["_sim"] + keys
    return frame.sort_values(keys, kind="stable").drop(columns="_sim", errors="ignore")


def metrics_summary(latent_metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    """Mean detection score, specificity and sensitivity per calibration method."""
    if not _has_columns(latent_metrics, METRIC_COLUMNS):
        return None
    numeric = ["detection_score", "specificity", "sensitivity"] + [
        c for c in ("precision", "spearman", "auroc") if c in latent_metrics.columns]
    frame = latent_metrics[numeric + ["calibration"]].copy()
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    out = frame.groupby("calibration", sort=True)[numeric].mean()
    out["latents"] = frame.groupby("calibration", sort=True).size()
    return out.reset_index()


def threshold_note(summary: Mapping[str, Any]) -> str:
    """The sentence that states the specificity threshold (or that none was given)."""
    if "active_threshold" in summary:
        thr = _format_value(summary["active_threshold"])
        return (
            f"Specificity and sensitivity count a context as predicted active when its simulated "
            f"(raw or calibrated) activation exceeds active_threshold = {thr}. Raw expected-value predictions are "
            f"never exactly 0, so specificity depends on this threshold."
        )
    return "No specificity threshold (active_threshold) was given: specificity figures are not comparable."


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
table.summary th { text-align: left; background: #f4f4f4; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #444; } .note { color: #555; font-style: italic; }
"""


def primary_rows(frame: pd.DataFrame | None, positions: str | None) -> pd.DataFrame | None:
    """Rows of the primary positions (all rows when there is no ``positions`` column or value)."""
    if not isinstance(frame, pd.DataFrame) or positions is None or "positions" not in frame.columns:
        return frame
    return frame[frame["positions"] == positions]


HEADLINE_COLUMNS = ["condition", "selection", "fraction", "calibration", "positions", "n_latents", "n_true_kept",
                    "ce_mean", "ce_lo", "ce_hi", "delta_zero_mean", "delta_zero_lo", "delta_zero_hi", "n"]
HEADLINE_NUMBERS = ["ce_mean", "ce_lo", "ce_hi", "delta_zero_mean", "delta_zero_lo", "delta_zero_hi"]


def headline(ce: pd.DataFrame | None, positions: str | None = None) -> pd.DataFrame | None:
    """The headline rows of the ``ce`` table: every baseline, and the top selection at the
    headline fractions for each calibration method (primary positions), numbers as in ``ce``."""
    ce = primary_rows(ce, positions)
    if not _has_columns(ce, ["condition", "ce_mean"]):
        return None
    base = ce[~ce["condition"].astype(str).str.startswith("simulated")]
    sim = ce[ce["condition"] == "simulated"]
    if {"selection", "fraction"} <= set(sim.columns):
        frac = pd.to_numeric(sim["fraction"], errors="coerce")
        keep = np.zeros(len(sim), dtype=bool)
        for f in HEADLINE_FRACTIONS:
            keep |= np.isclose(frac.to_numpy(float), f)
        sim = sim[(sim["selection"] == "top") & keep]
    # "All latents simulated" both ways: the paper's accounting (fraction 1.0 of the latents with a
    # calibrated prediction; the rest keep their true values, n_true_kept) beside the strict one.
    strict = ce[ce["condition"] == "simulated_strict"]
    out = pd.concat([base, sim, strict], ignore_index=True)
    return out[[c for c in HEADLINE_COLUMNS if c in out.columns]]


def headline_html(frame: pd.DataFrame | None) -> str:
    """The headline table: numbers with 4 decimals (a test compares them with the ``ce`` table)."""
    if frame is None or frame.empty:
        return "<p class='note'>No CE results.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for _, r in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = r[c]
            if c in HEADLINE_NUMBERS:
                text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.4f}"
            elif c == "fraction":
                text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):g}"
            else:
                text = _format_value(v)
            cells.append(f"<td data-col='{html.escape(c)}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='headline'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def oracle_note(crossings: Mapping[str, Any] | None) -> str:
    """The sentence giving the specificity at which the oracle's CE crosses zero-ablation."""
    if not crossings:
        return "No oracle crossing was computed."
    parts = []
    for name, value in crossings.items():
        v = float(value) if value is not None else math.nan
        parts.append(f"{name}: " + ("never crosses in the measured range" if math.isnan(v) else f"{v:.5f}"))
    return ("Specificity at which the oracle's CE crosses zero-ablation (positions / false-negative rate; "
            "linear interpolation between measured points): " + "; ".join(parts) + ".")


def examples_html(examples: Sequence[Mapping[str, Any]] | None) -> str:
    """The example latents as an escaped table: explanation, score, metrics, top contexts."""
    if not examples:
        return "<p class='note'>No example latents.</p>"
    rows = []
    for ex in examples:
        contexts = "".join(f"<li>{html.escape(str(c))}</li>" for c in ex.get("top_contexts", []))
        metrics = ", ".join(f"{k} {_format_value(v)}" for k, v in (ex.get("metrics") or {}).items())
        rows.append(
            f"<tr><td>{html.escape(str(ex.get('latent')))}</td><td>{html.escape(_format_value(ex.get('score')))}</td>"
            f"<td class='text'>{html.escape(str(ex.get('explanation', '')))}</td>"
            f"<td class='text'>{html.escape(metrics)}</td><td class='text'><ol>{contexts}</ol></td></tr>")
    return ("<table class='examples'><tr><th>latent</th><th>detection score</th><th>explanation</th>"
            "<th>raw predictions (eval)</th>"
            "<th>top eval contexts (true activation; target token in [brackets])</th></tr>"
            + "".join(rows) + "</table>")


_CSS = _CSS + "td.text { text-align: left; max-width: 420px; } ol { margin: 0; padding-left: 1.2em; }\n"


def write_report(
    out_dir: Path,
    ce: pd.DataFrame,
    latent_metrics: pd.DataFrame,
    distributions: dict[str, np.ndarray],
    summary: dict,
    *,
    oracle: pd.DataFrame | None = None,
    sample_size: pd.DataFrame | None = None,
    relation: pd.DataFrame | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.html`` and its PNG figures (:data:`ALL_FIGURES`) into ``out_dir``; return the
    HTML path. ``meta`` holds run (a name), positions (the primary positions), n_sequences,
    n_contexts, n_latents, n_calib_contexts, crossings (oracle) and methods (pipeline_methods: the
    explainer, scorer and simulator, stated on every figure, caption and in the summary) for the captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(summary or {})
    meta = dict(meta or {})
    for role, name in (meta.get("methods") or {}).items():  # the summary table names them too
        summary.setdefault(role, name)
    threshold = summary.get("active_threshold")
    positions = meta.get("positions")
    ce_main = primary_rows(ce, positions)
    n_seq, n_ctx, n_lat = meta.get("n_sequences", "?"), meta.get("n_contexts", "?"), meta.get("n_latents", "?")
    pos_text = f"{positions} positions" if positions else "positions as configured"
    n_dist = sum(np.size(v) for k, v in (distributions or {}).items() if k == "true")
    stamps = {
        FIG1: stamp_text(meta, "eval", f"{n_dist} sampled (context, latent) pairs per series"),
        FIG3: stamp_text(meta, "eval", f"{n_seq} sequences ({pos_text})"),
        FIG4: stamp_text(meta, "eval", f"{n_lat} latents x {n_ctx} contexts"),
        FIG_CALIB: stamp_text(meta, "calib (fit) / eval (judged)", f"{n_seq} sequences, {n_lat} latents ({pos_text})"),
        FIG_ORACLE: stamp_text(meta, "eval", f"{n_seq} sequences, {n_lat} latents ({pos_text})"),
        FIGA2: stamp_text(meta, "calib subsets (fit) / eval (judged)", f"{n_seq} eval sequences ({pos_text})"),
        FIG_EXAMPLES: stamp_text(meta, "eval", f"{n_ctx} contexts per latent"),
    }
    lines = baselines(ce_main)
    zero = lines.get("zero_ablation")
    comparison = calibration_comparison(ce_main, latent_metrics)
    plot_distributions(distributions, out_dir / FIG1, stamps[FIG1])
    plot_ce_sweep(ce_main, out_dir / FIG3, stamps[FIG3])
    plot_specificity_sensitivity(latent_metrics, out_dir / FIG4, threshold, relation, stamps[FIG4])
    plot_calibration_comparison(comparison, out_dir / FIG_CALIB, zero, stamps[FIG_CALIB])
    plot_oracle(primary_rows(oracle, positions), out_dir / FIG_ORACLE,
                {k: v for k, v in lines.items() if k in ("zero_ablation", "transcoder", "clean")}, stamps[FIG_ORACLE])
    plot_sample_size(primary_rows(sample_size, positions), out_dir / FIGA2, zero, stamps[FIGA2])
    plot_examples(examples, out_dir / FIG_EXAMPLES, stamps[FIG_EXAMPLES])

    title = str(summary.get("title", "nlrewrite report"))
    figures = [
        (FIG1, "Figure 1. Distribution of true activations and of simulated activations before "
               "(raw) and after calibration, over sampled (context, latent) pairs (log count)."),
        (FIG3, "Figure 3. Next-token cross-entropy minus zero-ablation cross-entropy on the same sequences "
               "(below 0: better than zeroing every latent), against the fraction of latents replaced by "
               "simulated activations (log scale); one panel per calibration method, shared y axis. Blue: the "
               "top latents by detection score, band = paired bootstrap 95% interval of the difference. Orange: "
               "random latents, mean over the seeds, band = the seeds' min-max spread (with one seed: its paired "
               "interval). Hollow diamond at 100%: every latent simulated, strict (a latent without a calibrated "
               "prediction predicts 0 instead of keeping its true value), with its paired interval. Horizontal "
               "lines, named at their right end: zero-ablation (0), the transcoder with true latents and, when "
               "it fits the scale, the clean model; the other ablations are in the headline table."),
        (FIG4, "Figure 4. Per-latent specificity and sensitivity of simulated activity against "
               "the latent's detection score, per calibration method; lines are means over equal-count bins "
               "of detection score, rho the Spearman rank correlation over latents. " + threshold_note(summary)),
        (FIG_CALIB, "Calibration comparison. Left: CE with the top 10% and 100% of latents (by detection score) "
                    "simulated, per calibration method, with bootstrap 95% intervals and zero-ablation. Right: "
                    "mean per-latent specificity, sensitivity and (threshold-free) AUROC; each method's activity "
                    "threshold is in the table below."),
        (FIG_ORACLE, "Specificity threshold (oracle). The true activations of every explained latent, with false "
                     "positives injected at a controlled rate (values drawn from the latent's calib activations) "
                     "and true activations dropped at a false-negative rate, patched in like simulated ones (TopK "
                     "re-applied). Specificity and sensitivity are measured on the injected activity before TopK. "
                     + oracle_note(meta.get("crossings"))),
        (FIGA2, "Figure A2. Calibration sample size: maps fit on nested subsets of the calib split's sequences, "
                "judged on eval: CE with the top latents simulated (left) and mean specificity/sensitivity "
                "(right, a calibrated prediction counts as active above active_threshold)."),
        (FIG_EXAMPLES, "Example latents: predicted against true activation on every eval context, raw and after "
                       "calibration (dotted: y = x). Their explanations and top contexts are in the table below."),
    ]
    stamp_by_name = dict(stamps)
    figure_html = "".join(
        f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption.split('.')[0])}'>"
        f"<figcaption>{html.escape(caption)} [{html.escape(stamp_by_name[name])}]</figcaption></figure>"
        for name, caption in figures
    )
    crossing_text = oracle_note(meta.get("crossings"))
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(INTRO)}</p>"
        f"<h2>Headline</h2>"
        f"<p class='note'>{html.escape(stamp_text(meta, 'eval', f'{n_seq} sequences ({pos_text})'))}; "
        f"CE in nats, bootstrap 95% intervals over sequences; delta_zero = paired difference against zero-ablation "
        f"(negative: better than zeroing the layer).</p>"
        f"{headline_html(headline(ce, positions))}"
        f"<p class='note oracle'>{html.escape(crossing_text)}</p>"
        f"<h2>Summary</h2>{summary_html(summary)}"
        f"<p class='note threshold'>{html.escape(threshold_note(summary))}</p>"
        f"<h2>Figures</h2>{figure_html}"
        f"<h2>Calibration comparison</h2>"
        f"{frame_html(comparison, 'calibration', 'No calibration results.')}"
        f"<h2>Specificity threshold (oracle)</h2>"
        f"{frame_html(oracle, 'oracle', 'No oracle results.')}"
        f"<h2>Calibration sample size</h2>"
        f"{frame_html(sample_size, 'sample-size', 'No sample-size ablation.')}"
        f"<h2>Example latents</h2>{examples_html(examples)}"
        f"<h2>Cross-entropy (every condition, both position sets)</h2>"
        f"{frame_html(_sorted_ce(ce), 'ce', 'No CE results.')}"
        f"<h2>Per-latent metrics (means)</h2>"
        f"{frame_html(metrics_summary(latent_metrics), 'latent-metrics', 'No per-latent metrics.')}"
        f"<h2>Detection score vs activity (binned means)</h2>"
        f"{frame_html(relation, 'score-relation', 'No binned metrics.')}"
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
    path = out_dir / "report.html"
    tmp = out_dir / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


INTRO = (
    "This run replaces one MLP layer of a small language model with a sparse transcoder, writes a "
    "natural-language explanation for every transcoder latent, lets a simulator predict each latent's "
    "activation from its explanation alone, calibrates those predictions on a held-out split, and patches "
    "them back into the model. Next-token cross-entropy (CE, nats; lower is better) shows how much of the "
    "layer the explanations capture: the clean model and the transcoder with its true latents are the "
    "floor; zero-ablation (every latent 0) is what the layer is worth; a simulated condition is only "
    "useful when its CE is below zero-ablation."
)
