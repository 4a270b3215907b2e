"""How the `nlrewrite` commands print: aligned text tables (or CSV, JSON lines), the CE headline
table and a run's summary. Argument parsing and the commands themselves are in flows/cli.py."""

from __future__ import annotations

import csv
import json
import math
from typing import Any


def format_table(cols: list[str], rows: list[tuple[Any, ...]] | list[list[Any]], fmt: str = "table") -> str:
    """Render rows as an aligned text table, CSV or JSON lines."""
    if fmt == "json":
        return "\n".join(json.dumps(dict(zip(cols, r)), default=str) for r in rows)
    if fmt == "csv":
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(cols)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


HEADLINE_COLUMNS = ["condition", "selection", "fraction", "calibration", "n_latents", "n_true_kept", "ce_mean",
                    "ce_lo", "ce_hi", "delta_zero_mean"]


def headline_rows(ce: list[dict[str, Any]], positions: str, calibrations: tuple[str, ...] = ("none", "quantile")
                  ) -> list[list[Any]]:
    """The CE table as printed: baselines, then top and random (mean over seeds; the interval is
    the seeds' min..max of their bootstrap bounds) per fraction, for the headline calibrations, each
    followed by its strict "all latents simulated" row (no true value kept) beside the paper's
    accounting (fraction 1.0 of the latents with a calibrated prediction)."""
    rows = [r for r in ce if r.get("positions", positions) == positions]
    out = [[r.get(c) for c in HEADLINE_COLUMNS] for r in rows if not str(r["condition"]).startswith("simulated")]
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["condition"] == "simulated" and r["calibration"] in calibrations:
            groups.setdefault((r["calibration"], r["selection"], r["fraction"]), []).append(r)
    order = sorted(groups.items(), key=lambda kv: (calibrations.index(kv[0][0]), kv[0][1] != "top", kv[0][2]))
    strict = {r["calibration"]: r for r in rows if r["condition"] == "simulated_strict"}
    for i, ((cal, sel, frac), g) in enumerate(order):
        def mean(c: str, g: list[dict[str, Any]] = g) -> float:
            return sum(r[c] for r in g) / len(g)

        label = sel if len(g) == 1 else f"{sel} (x{len(g)})"
        kept = max((r.get("n_true_kept") or 0) for r in g) if any(r.get("n_true_kept") is not None for r in g) else None
        out.append(["simulated", label, frac, cal, g[0]["n_latents"], kept, mean("ce_mean"),
                    min(r["ce_lo"] for r in g), max(r["ce_hi"] for r in g), mean("delta_zero_mean")])
        last_top = sel == "top" and (i + 1 == len(order) or order[i + 1][0][:2] != (cal, "top"))
        if last_top and cal in strict:  # beside the paper's fraction-1.0 row
            out.append([strict[cal].get(c) for c in HEADLINE_COLUMNS])
    return out


def print_result(positions: str, result: dict[str, Any]) -> None:
    """The CE headline table, the summary and where the run record and report are."""
    print()
    print(f"CE (nats) on the eval split, {positions} positions, run {result['run_id']} "
          f"(every condition and calibration: nlrewrite query {result['run_id']} 'select * from ce'):")
    print(format_table(HEADLINE_COLUMNS, headline_rows(result["ce"], positions)))
    print()
    for k, v in result["summary"].items():
        print(f"{k}: {rounded(v)}")
    print(f"run record: {result['run_json']}")
    print(f"report: {result['report']}")


def rounded(v: Any) -> str:
    """A summary value as printed: floats to 4 decimals, dicts and lists item by item, None as '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {rounded(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(rounded(x) for x in v)
    return str(v)
