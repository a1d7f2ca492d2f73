"""What a run did, for a person: the end-of-run table and ``curves.png``.

``orchestrate report RUN_DIR [RUN_DIR ...] [out=PNG]`` draws train loss, eval loss, learning rate
and tokens/s over steps from each run's ``metrics.jsonl`` (several runs, or a sweep directory's
trials, overlaid), and prints each run's table. The launcher prints the same table and writes
``curves.png`` at the end of every local run, so nobody has to read ``summary.json`` by eye or
have W&B online to see the curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from launch.prepare import UsageError

CURVES = "curves.png"
_PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"),
           ("tokens_per_s", "tokens/s"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's logged records; a half-written last line (a running or killed run) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def number(value: Any, fmt: str) -> str:
    """``value`` formatted, or '-' where it is missing (a run that has not logged it yet)."""
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _arrow(before: Any, after: Any, fmt: str) -> str:
    return f"{number(before, fmt)} -> {number(after, fmt)}"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _mfu(metrics: list[dict[str, Any]]) -> Optional[float]:
    values = [r["mfu"] for r in metrics if isinstance(r.get("mfu"), (int, float))]
    return sorted(values)[len(values) // 2] if values else None


def summary_table(run_dir: Path, wall_s: Optional[float] = None) -> str:
    """A short table of a finished run's summary.json (the JSON stays in the file)."""
    s = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    peaks, planned = s.get("peak_memory_mb") or [], s.get("planned_peak_memory_mb") or []
    memory = ", ".join(
        f"rank {r}: {number(p, '.0f')} MB" + (f" (planned {number(planned[r], '.0f')})" if r < len(planned) else "")
        for r, p in enumerate(peaks)) or "-"
    acc_b, acc_a = s.get("eval_accuracy_before"), s.get("eval_accuracy_after")
    mfu = _mfu(metrics)
    rows = [
        ("eval loss", _arrow(s.get("eval_loss_before"), s.get("eval_loss_after"), ".4f")),
        ("exact match", f"{number(acc_b * 100 if acc_b is not None else None, '.1f')}% -> "
                        f"{number(acc_a * 100 if acc_a is not None else None, '.1f')}%"
         if acc_a is not None else "-"),
        ("train loss", _arrow(s.get("train_loss_first"), s.get("train_loss_last"), ".4f")),
        ("steps", f"{s.get('steps', '-')} on {s.get('world_size', '-')} {s.get('device', '')} ranks, "
                  f"{s.get('strategy', '-')}, {s.get('precision', '-')}"),
        ("tokens/s", number(s.get("tokens_per_s"), ",.0f") + (f" (MFU {mfu:.1%})" if mfu is not None else "")),
        ("peak memory", memory),
        ("time", f"training {duration(s.get('train_time_s'))}"
                 + (f", wall {duration(wall_s)}" if wall_s is not None else "")),
        ("adapter", str(run_dir / "adapter")),
        ("summary", str(run_dir / "summary.json")),
        ("curves", str(run_dir / CURVES) if (run_dir / CURVES).exists() else "-"),
    ]
    if (run_dir / "eval_samples.jsonl").exists():
        rows.append(("eval answers", str(run_dir / "eval_samples.jsonl")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def curves_figure(run_dirs: Sequence[Path], labels: Optional[Sequence[str]] = None):
    """One panel per metric, one line per run; runs without a metric simply leave it out. A bare
    Figure, not pyplot: no GUI backend or global figure registry, and half a second less to import
    at the end of every run."""
    from matplotlib.figure import Figure

    labels = list(labels) if labels else [p.name for p in run_dirs]
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    for ax, (key, title) in zip(axes.flat, _PANELS):
        drawn = False
        for run_dir, label in zip(run_dirs, labels):
            points = [(r["step"], r[key]) for r in read_metrics(run_dir)
                      if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif len(run_dirs) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(labels[0] if len(run_dirs) == 1 else f"{len(run_dirs)} runs")
    fig.tight_layout()
    return fig


def write_curves(run_dirs: Sequence[Path], out: Path, labels: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Draw the curves into ``out``; None (and one warning) where it cannot be written, since
    a picture is bookkeeping: a full disk at the end of a run must not turn it into a failure."""
    import io

    from orchestrator.rundir import write_bookkeeping

    fig = curves_figure(run_dirs, labels)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return out if write_bookkeeping(out, buf.getvalue(), "the curves (curves.png)") else None


def _expand(paths: Sequence[Path]) -> list[Path]:
    """A sweep directory stands for its trials."""
    runs: list[Path] = []
    for p in paths:
        if (p / "sweep.json").exists():
            runs += sorted(t for t in p.glob("trial-*") if (t / "metrics.jsonl").exists())
        else:
            runs.append(p)
    return runs


def cmd_report(args: list[str]) -> int:
    outs = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    paths = [Path(a).resolve() for a in args if not a.startswith("out=")]
    if not paths or any(a.startswith("-") for a in args):
        raise UsageError("report takes run directories (or a sweep directory) and optionally out=PNG")
    runs = _expand(paths)
    missing = [p for p in runs if not (p / "metrics.jsonl").exists()]
    if missing:
        raise UsageError(f"report: {missing[0]}: no metrics.jsonl; is it a run directory?")
    if not runs:
        raise UsageError(f"report: {paths[0]} holds no trials with metrics yet")
    default = runs[0] / CURVES if len(runs) == 1 else (paths[0] if len(paths) == 1 else Path.cwd()) / CURVES
    target = Path(outs[0]) if outs else default
    out = write_curves(runs, target)
    if out is None:  # the report was asked for: its file not being written is the error
        raise UsageError(f"report: {target} could not be written (see the warning above)")
    for run in runs:
        if (run / "summary.json").exists():
            print(f"{run.name}:\n{summary_table(run)}")
    print(f"curves: {out}")
    return 0
