"""Single-node launcher: torchrun with one rank per GPU (or 2 CPU ranks without GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def torchrun_command(cfg, run_dir: Path) -> list[str]:
    nproc = cfg.launcher.nproc_per_node or default_nproc()
    return [
        sys.executable, "-m", "launch.torchrun",  # torchrun, minus its traceback on failure
        "--standalone", f"--nproc_per_node={nproc}", f"--max_restarts={cfg.launcher.max_restarts}",
        "-m", "launch.worker", str(run_dir),
    ]


def worker_env(nproc: int) -> dict[str, str]:
    """Environment for the ranks: split CPU threads between ranks unless the user chose."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(nproc, 1)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(cfg, run_dir: Path, log_path: Optional[Path] = None) -> int:
    """Run torchrun in the foreground; returns its exit code. With ``log_path`` (sweep trials)
    the ranks' output goes to that file instead of the console."""
    cmd = torchrun_command(cfg, run_dir)
    nproc = cfg.launcher.nproc_per_node or default_nproc()
    if log_path is None:
        return subprocess.call(cmd, env=worker_env(nproc))
    with open(log_path, "ab") as log:
        return subprocess.call(cmd, env=worker_env(nproc), stdout=log, stderr=subprocess.STDOUT)
