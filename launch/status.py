"""``orchestrate status [RUN_DIR | SWEEP_DIR ...]``: one line per run, newest first.

Each line: name, state (running / stopped at a checkpoint / finished / failed with its reason),
step of total, last loss, eval loss, tokens/s, ETA while running, latest checkpoint, and for
Slurm runs the job id with the job's state from ``squeue`` (or ``sacct`` once the job has left
the queue). Sweeps list their trials under them.

It reads only the run directories (``state.json``, ``metrics.jsonl``, ``checkpoints/latest``,
``config.yaml``; orchestrator/rundir.py defines them) and asks Slurm with a timeout, so it never
blocks on, or writes to, a running job. A state file that says "running" while no process holds
the run's lock and no Slurm job is left means the run died without saying so (kill -9, OOM, a
node failure): that is reported as failed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.prepare import UsageError
from launch.report import duration, number, read_metrics

_TIMEOUT_S = 10


@dataclass
class RunStatus:
    name: str
    state: str  # running | stopped | finished | failed | pending | new
    detail: str = ""  # why it failed, or where it stopped
    step: Optional[int] = None
    total: Optional[int] = None
    loss: Optional[float] = None
    eval_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    checkpoint: Optional[str] = None
    job: Optional[str] = None  # "JOBID STATE"
    modified: float = 0.0


def slurm_job_state(job_id: str) -> Optional[str]:
    """The job's state from squeue, else sacct; None where neither answers in time."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            continue
        states = [s.strip().split()[0] for s in out.stdout.splitlines() if s.strip()]
        if out.returncode == 0 and states:
            return states[0]
    return None


def _total_steps(run_dir: Path) -> Optional[int]:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    steps = (cfg.get("trainer") or {}).get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def _latest_checkpoint(run_dir: Path) -> Optional[str]:
    latest = run_dir / "checkpoints" / "latest"
    try:
        name = latest.read_text().strip()
    except OSError:
        return None
    return name if (run_dir / "checkpoints" / name).is_dir() else None


def run_status(run_dir: Path, ask_slurm: bool = True) -> RunStatus:
    from orchestrator import rundir

    metrics = read_metrics(run_dir)
    train = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    evals = [m for m in metrics if isinstance(m.get("eval_loss"), (int, float))]
    st = RunStatus(name=run_dir.name, state="new", total=_total_steps(run_dir),
                   checkpoint=_latest_checkpoint(run_dir), modified=_modified(run_dir))
    if train:
        last = train[-1]
        st.step, st.loss, st.tokens_per_s = last["step"], last["loss"], last.get("tokens_per_s")
    if evals:
        st.eval_loss = evals[-1]["eval_loss"]
    recorded = rundir.read_state(run_dir)
    job_id = _job_id(run_dir)
    job_state = slurm_job_state(job_id) if job_id and ask_slurm else None
    if job_id:
        st.job = f"{job_id} {job_state or '?'}"
    summary = run_dir / "summary.json"
    if recorded.get("state"):
        st.state = recorded["state"]
        st.detail = recorded.get("reason") or ""
    elif summary.exists():
        st.state = "finished"
    elif st.checkpoint:
        st.state = "stopped"
    if st.state == "running" and rundir.is_held(run_dir) is False:
        if job_state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
            st.state = "running" if job_state != "PENDING" else "pending"
        else:
            st.state, st.detail = "failed", "died without a word (no process holds the run)"
    if st.state == "new" and job_state == "PENDING":
        st.state = "pending"
    if st.state == "stopped" and st.checkpoint:
        st.detail = st.detail or f"at {st.checkpoint}"
    if st.state == "running" and st.step and st.total:
        times = [m["step_time_s"] for m in train[-20:] if isinstance(m.get("step_time_s"), (int, float))]
        if times:
            st.eta_s = sorted(times)[len(times) // 2] * max(st.total - st.step, 0)
    return st


def _job_id(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / "slurm_job_id").read_text().strip() or None
    except OSError:
        return None


def _modified(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "config.yaml",
                                         run_dir / "state.json") if p.exists()]
    return max(times, default=run_dir.stat().st_mtime if run_dir.exists() else 0.0)


HEADER = ("run", "state", "step", "loss", "eval", "tok/s", "eta", "checkpoint", "slurm")


def _row(st: RunStatus, indent: str = "") -> tuple[str, ...]:
    state = st.state + (f" ({st.detail})" if st.detail and st.state in ("failed", "stopped") else "")
    step = f"{st.step if st.step is not None else 0}/{st.total if st.total else '?'}"
    return (indent + st.name, state, step, number(st.loss, ".4f"), number(st.eval_loss, ".4f"),
            number(st.tokens_per_s, ",.0f"), duration(st.eta_s), st.checkpoint or "-", st.job or "-")


def table(rows: list[tuple[str, ...]]) -> str:
    rows = [HEADER, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _is_sweep(path: Path) -> bool:
    return (path / "sweep.json").exists()


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").exists()


def collect(paths: list[Path], ask_slurm: bool = True) -> list[tuple[str, ...]]:
    """Table rows: runs newest first, each sweep followed by its trials."""
    entries = []
    for p in paths:
        if _is_sweep(p):
            trials = [run_status(t, ask_slurm) for t in sorted(p.glob("trial-*")) if _is_run(t)]
            entries.append((max([t.modified for t in trials], default=p.stat().st_mtime), p, trials))
        elif _is_run(p):
            st = run_status(p, ask_slurm)
            entries.append((st.modified, p, st))
    rows: list[tuple[str, ...]] = []
    for _, path, item in sorted(entries, key=lambda e: e[0], reverse=True):
        if isinstance(item, list):
            done = sum(t.state == "finished" for t in item)
            rows.append((f"{path.name}/", f"sweep: {done}/{len(item)} finished", *("",) * 7))
            rows += [_row(t, "  ") for t in item]
        else:
            rows.append(_row(item))
    return rows


def cmd_status(args: list[str]) -> int:
    overrides = [a for a in args if "=" in a]
    paths = [Path(a).resolve() for a in args if "=" not in a]
    if any(a.startswith("-") for a in args):
        raise UsageError("status takes run or sweep directories (default: all under run.root)")
    if not paths:
        from launch.prepare import compose

        root = Path(compose(overrides).run.root).resolve()
        if not root.is_dir():
            print(f"no runs under {root}")
            return 0
        paths = [p for p in root.iterdir() if _is_run(p)]
        sweeps = root / "sweeps"
        paths += [p for p in sweeps.iterdir() if _is_sweep(p)] if sweeps.is_dir() else []
    else:
        unknown = [p for p in paths if not (_is_run(p) or _is_sweep(p))]
        if unknown:
            raise UsageError(f"status: {unknown[0]}: neither a run directory (config.yaml) nor a sweep (sweep.json)")
    rows = collect(paths)
    print(table(rows) if rows else "no runs")
    return 0
