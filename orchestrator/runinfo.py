"""What a run records about itself: code version, library versions, hardware.

Goes into W&B's run config and the summary, so a number can be traced to the code and machine
that produced it. Nothing from the environment is copied wholesale: secrets stay out.

The code is named by its version always and by its git commit where it runs from a clone; an
installed wheel has no commit, and the record says so rather than guessing (a git command run
from site-packages would name whatever repository the environment happens to sit in).
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import __version__, hostalloc

if TYPE_CHECKING:
    import torch

CODE_ROOT = Path(__file__).resolve().parent.parent  # the clone, or site-packages for a wheel

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed",
             "hydra-core", "wandb", "qlora-orchestrator")


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the clone the code runs from (``-dirty`` with uncommitted changes); None
    where the code is not a git checkout's (an installed package)."""
    repo = repo or CODE_ROOT
    if not (repo / ".git").exists():  # a directory in a clone, a file in a worktree
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def code_info() -> dict[str, Any]:
    """Version, commit and where the code ran from: for summary.json and W&B's run config."""
    commit = git_commit()
    if commit:
        source = f"git checkout {CODE_ROOT}"
    elif (CODE_ROOT / ".git").exists():
        source = f"git checkout {CODE_ROOT} (git could not read its commit)"
    else:
        source = f"installed package in {CODE_ROOT} (not a git checkout: no commit to record)"
    return {"version": __version__, "git_commit": commit, "code_source": source}


def describe_code() -> str:
    """One line for ``orchestrate --version``."""
    commit = git_commit()
    where = f"git {commit}, {CODE_ROOT}" if commit else f"installed in {CODE_ROOT}, no git checkout"
    return f"qlora-orchestrator {__version__} ({where})"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(world_size: int, strategy: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"world_size": world_size, "strategy": strategy, "cpu": _cpu_model(),
                            "host": platform.node(), "python": platform.python_version(),
                            "host_allocator": hostalloc.active()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_per_node"] = torch.cuda.device_count()
    return info


# Dense bf16/fp16 peak of common accelerators (TFLOP/s), for the MFU estimate.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device where it is known (GPUs by name); None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
