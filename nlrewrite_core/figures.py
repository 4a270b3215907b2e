"""The run report's figures: PNGs drawn from the evaluate stage's tables, and the data preparation they
share with the HTML report (:func:`aggregate_ce`, :func:`baselines`, :func:`calibration_comparison`).
The HTML page itself (tables, captions, ``write_report``) is in :mod:`nlrewrite_core.report`.

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

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display,
no network). Missing or empty inputs give a figure that says so instead of an error. Each figure
states the run, the split and n, and the methods (the stamp that ``_save`` writes along its bottom).
"""

from __future__ import annotations

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


def has_columns(frame: pd.DataFrame | None, columns: list[str]) -> TypeGuard[pd.DataFrame]:
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
    if not has_columns(ce, needed):
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
    if not has_columns(ce, ["condition", column]):
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
    if not has_columns(latent_metrics, METRIC_COLUMNS):
        for ax in axes:
            _note(ax, "No per-latent metrics.")
        _save(fig, path, stamp)
        return
    suffix = f" (active if prediction > {threshold})" if threshold is not None else ""
    rules = {}
    if "threshold_rule" in latent_metrics.columns:
        rules = latent_metrics.groupby("calibration")["threshold_rule"].first().astype(str).to_dict()
        suffix = ""
    rel_table = relation if has_columns(relation, ["calibration", "metric", "score_mean", "mean", "rho"]) else None
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
    if has_columns(ce, ["condition", "selection", "fraction", "calibration", "ce_mean"]):
        sim = ce[(ce["condition"] == "simulated") & (ce["selection"] == "top")]
        for _, r in sim.iterrows():
            frac = float(r["fraction"])
            if not any(math.isclose(frac, f) for f in HEADLINE_FRACTIONS):
                continue
            row = out.setdefault(str(r["calibration"]), {"calibration": str(r["calibration"])})
            row[f"ce@{frac:g}"] = float(r["ce_mean"])
            row[f"ce@{frac:g} lo"] = float(r.get("ce_lo", np.nan))
            row[f"ce@{frac:g} hi"] = float(r.get("ce_hi", np.nan))
    if has_columns(latent_metrics, ["calibration"]):
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
    if not has_columns(oracle, ["fp_rate", "fn_rate", "specificity", "ce_mean"]):
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
    if not has_columns(sizes, ["calibration", "n_calib_contexts", "fraction", "ce_mean"]):
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
