"""The sweep directory on disk, and a trial's state read back from its run directory.

```
SWEEP_DIR/sweep.json          name, kind, metric, direction, swept keys, command line
SWEEP_DIR/trials.txt          trial k's run directory on line k+1 (what Slurm array task k trains)
SWEEP_DIR/trial-007/          an ordinary run directory (config.yaml, summary.json, ...) plus
          trial.json          index, overrides, swept values; the reason where it never started
          exit_code           written when its launcher returned (local) or its job ended (Slurm)
```
A trial's status is derived from these files alone, the same way for local and Slurm sweeps,
so ``orchestrate sweep-report`` works while a Slurm array is still running.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
EXIT_FILE = "exit_code"
LIST_FILE = "trials.txt"


class SweepDirError(ValueError):
    pass


def trial_dir(sweep_dir: Path, index: int) -> Path:
    # Slurm names array logs with %3a, which pads the same way.
    return sweep_dir / f"trial-{index:03d}"


def write_sweep(sweep_dir: Path, record: dict[str, Any]) -> None:
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        raise SweepDirError(f"{sweep_dir}: no {SWEEP_FILE}; is it a sweep directory (orchestrate train -m)?")
    return json.loads(path.read_text())


def write_trial(path: Path, index: int, overrides: list[str], params: dict[str, Any],
                error: Optional[str] = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    record = {"index": index, "overrides": overrides, "params": params}
    if error:
        record["error"] = error
    (path / TRIAL_FILE).write_text(json.dumps(record, indent=2) + "\n")


def record_exit(path: Path, code: int) -> None:
    (path / EXIT_FILE).write_text(f"{code}\n")


def _error_line(path: Path) -> Optional[str]:
    """The last ``error: ...`` line the trial's ranks or launcher printed."""
    found = None
    for log in sorted(path.glob("train.log")) + sorted(path.glob("slurm-*.out")):
        for line in log.read_text(errors="replace").splitlines():
            if "error: " in line:
                found = line.split("error: ", 1)[1].strip()
    return found


def trial_state(path: Path) -> dict[str, Any]:
    """trial.json plus ``status`` (completed, failed, stopped, pending), ``reason`` and ``summary``."""
    state = json.loads((path / TRIAL_FILE).read_text())
    state.update(run_dir=str(path), summary={}, reason="")
    summary = path / "summary.json"
    code = path / EXIT_FILE
    if state.get("error"):
        state.update(status="failed", reason=state["error"])
    elif summary.exists():
        state.update(status="completed", summary=json.loads(summary.read_text()))
    elif code.exists() and int(code.read_text().strip() or 1) == 0:
        state.update(status="stopped", reason="stopped at a checkpoint before the last step")
    elif code.exists():
        rc = int(code.read_text().strip() or 1)
        state.update(status="failed", reason=_error_line(path) or f"exit code {rc}")
    else:
        state["status"] = "pending"
    return state


def trials(sweep_dir: Path) -> list[dict[str, Any]]:
    return [trial_state(p.parent) for p in sorted(sweep_dir.glob(f"trial-*/{TRIAL_FILE}"))]


def metric_value(state: dict[str, Any], metric: str) -> Optional[float]:
    """A trial's final ``metric`` if it is a usable number: what Optuna is told, what the
    report ranks by and what the console shows; None (missing, NaN, inf) marks the trial failed."""
    value = state["summary"].get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
