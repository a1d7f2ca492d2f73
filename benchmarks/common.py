"""What every benchmark does: one real ``orchestrate train`` per variant, outputs read back.

Each variant goes through the CLI in a subprocess (composition, torchrun, the ranks), so a
benchmark measures the pipeline users run, not a shortcut around it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def native_precision() -> str:
    """bf16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16), else fp32: an
    emulated bf16 would measure the emulation, not the code."""
    import torch

    sys.path.insert(0, str(ROOT))
    from orchestrator.distributed import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if resolve_precision("auto", device) == torch.bfloat16 else "fp32"


def train(run_dir: Path, overrides: list[str], reuse: bool = False) -> dict:
    """Train into ``run_dir``; returns ``{"summary": ..., "metrics": [...]}`` or ``{"error": line}``.

    Console output is off (logger=basic, no progress bar): the run directory holds what is read.
    With ``reuse``, a finished run made with exactly these overrides is read instead of trained
    again (an interrupted benchmark continues); one made with other overrides is an error, never
    silently mixed into a table. Without it, a run left in ``run_dir`` by an earlier benchmark is
    removed first: the benchmark measures a fresh run, not a resume (or a refused one).
    """
    run_dir = run_dir.resolve()
    args = [f"run.dir={run_dir}", "logger=basic", "logger.console=false", *overrides]
    if reuse and (run_dir / "summary.json").exists():
        if yaml.safe_load((run_dir / "overrides.yaml").read_text()) != args:
            return {"error": f"{run_dir} holds a finished run with other overrides; use another directory"}
        return read_run(run_dir)
    if not reuse and (run_dir / "overrides.yaml").exists():
        shutil.rmtree(run_dir)
    proc = subprocess.run([sys.executable, "-m", "launch", "train", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict:
    """A finished run's ``summary.json`` and ``metrics.jsonl``."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "metrics": metrics}


def train_steps(run: dict) -> list[dict]:
    """A read run's per-step training records (evaluation records left out)."""
    return [m for m in run["metrics"] if "loss" in m]


def steady_medians(steps: list[dict], warmup: int) -> dict:
    """Median tokens/s and step time once ``warmup`` steps are past (the last step at least),
    so start-up and allocator warm-up do not count."""
    warm = steps[min(warmup, len(steps) - 1):]
    return {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in warm),
            "step_time_s": statistics.median(m["step_time_s"] for m in warm)}
