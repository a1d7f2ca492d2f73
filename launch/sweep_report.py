"""``orchestrate sweep-report SWEEP_DIR``: trials ranked by the sweep's metric, as a table on
the console, ``report.csv`` and ``report.png`` (the metric against each swept parameter)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from launch.sweep_store import metric_value, read_sweep, trials

CSV_FILE = "report.csv"
PNG_FILE = "report.png"


def ranked(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sweep record, rows best first): trials with the metric by it, then the others by index."""
    sweep = read_sweep(sweep_dir)
    metric, sign = sweep["metric"], (1 if sweep["direction"] == "minimize" else -1)
    rows = []
    for t in trials(sweep_dir):
        s = t["summary"]
        rows.append({
            "trial": t["index"], "status": t["status"], metric: metric_value(t, metric),
            **{k: t["params"].get(k) for k in sweep["params"]},
            "steps": s.get("steps"), "tokens_per_s": s.get("tokens_per_s"),
            "eval_accuracy_after": s.get("eval_accuracy_after"),
            "overrides": " ".join(t["overrides"]), "reason": t["reason"], "run_dir": t["run_dir"],
        })
    rows.sort(key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0), r["trial"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i if row[metric] is not None else None
    return sweep, rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table; the failure reason closes each failed row."""
    cols = ["rank", "trial", "status", sweep["metric"], *sweep["params"], "steps", "tokens_per_s"]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    for r, row in zip(rows, cells):
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
        lines.append(line + (f"  ({r['reason']})" if r["reason"] else ""))
    return "\n".join(lines)


def write_csv(path: Path, sweep: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    cols = ["rank", "trial", "status", sweep["metric"], *sweep["params"], "steps", "tokens_per_s",
            "eval_accuracy_after", "overrides", "reason", "run_dir"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: Path, sweep: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """One panel per swept parameter: the metric of each completed trial, the best circled."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend or global figure registry

    metric, keys = sweep["metric"], sweep["params"] or ["trial"]
    done = [r for r in rows if r[metric] is not None]
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[key] for r in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:  # categorical values: evenly spaced, labelled
            labels = sorted({str(x) for x in xs})
            ax.set_xticks(range(len(labels)), labels)
            xs = [labels.index(str(x)) for x in xs]
        elif xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.scatter(xs, [r[metric] for r in done], color="tab:blue")
        if done:
            ax.scatter([xs[0]], [done[0][metric]], s=160, facecolors="none", edgecolors="tab:red",
                       label=f"best: trial {done[0]['trial']}")
            ax.legend(fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep['name']}: {sweep['metric']} of {len(done)} completed trials (of {len(rows)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(sweep_dir: Path) -> str:
    """Write report.csv and report.png into the sweep directory; return the text table."""
    sweep, rows = ranked(sweep_dir)
    write_csv(sweep_dir / CSV_FILE, sweep, rows)
    write_plot(sweep_dir / PNG_FILE, sweep, rows)
    best = next((r for r in rows if r["rank"] == 1), None)
    lines = [f"sweep {sweep['name']} ({sweep['kind']}, {len(rows)} trials): {sweep_dir}", table(sweep, rows)]
    if best:
        params = " ".join(f"{k}={_fmt(best[k])}" for k in sweep["params"])
        lines.append(f"best: trial {best['trial']} {sweep['metric']}={_fmt(best[sweep['metric']])} "
                     f"{params} in {best['run_dir']}")
    lines.append(f"written: {sweep_dir / CSV_FILE}, {sweep_dir / PNG_FILE}")
    return "\n".join(lines)
