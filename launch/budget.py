"""Will the run fit the memory its ranks will get? The planner's answer, asked before launch.

Loading and quantizing a large base takes minutes before an out-of-memory error, on Slurm
after the queue wait too; the planner knows the peak per rank before anything starts. So
``orchestrate train`` compares that peak with the memory the ranks will really have:

- local ranks on GPUs: the free memory of the GPUs the launcher sees (queried in a child
  process, so the launcher itself never holds a CUDA context beside its ranks), divided among
  the ranks that share a GPU;
- Slurm ranks on GPUs: ``plan.gpu_memory_gb`` (the launcher cannot see the job's nodes);
- ranks on CPU: the host's available memory (``MemAvailable``, or the cgroup's limit where it
  is lower) shared by the ranks of one node; on Slurm the job's ``launcher.mem``.
  ``plan.host_memory_gb`` replaces the measured value (tests, or a host shared with others).

Above the budget the run is refused with the plan's verdict and the changes that would fit,
unless ``plan.enforce=false``; within ``WARN_FRACTION`` of it, a warning.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

GiB = 2**30
#: A plan above this share of the budget is warned about: the planner lands within ~9% of the
#: measured peak on CPU (README), and allocator fragmentation is not in it.
WARN_FRACTION = 0.9


class BudgetError(ValueError):
    """A run refused before launch; the message is one line naming the cause and the way out."""


@dataclass(frozen=True)
class Budget:
    """Memory one rank may use, and where that number came from (for the message)."""

    per_rank: float
    device: str  # cuda | cpu
    ranks: int  # ranks sharing ``total`` (one GPU, or one host)
    total: float
    source: str


def gb(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


# -- what the ranks will have ------------------------------------------------------------
_PROBE = ("import json, torch\n"
          "print(json.dumps([[*torch.cuda.mem_get_info(i), torch.cuda.get_device_name(i)]"
          " for i in range(torch.cuda.device_count())]))")


def visible_gpus(timeout_s: float = 120.0) -> list[tuple[float, float, str]]:
    """(free, total, name) of each GPU this process would see (CUDA_VISIBLE_DEVICES and MIG
    applied), asked in a child process whose CUDA context goes away with it."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         timeout=timeout_s, check=True).stdout
    return [(float(f), float(t), str(n)) for f, t, n in json.loads(out.strip().splitlines()[-1])]


def gpu_budget(gpus: list[tuple[float, float, str]], nproc: int) -> Budget:
    """Rank i uses GPU i mod count (orchestrator/distributed.py); the tightest GPU decides."""
    best: Optional[Budget] = None
    for i, (free, _total, name) in enumerate(gpus[:nproc]):
        sharing = len(range(i, nproc, len(gpus)))
        b = Budget(free / sharing, "cuda", sharing, free,
                   f"free on GPU {i} ({name})" + (f" shared by {sharing} ranks" if sharing > 1 else ""))
        if best is None or b.per_rank < best.per_rank:
            best = b
    assert best is not None
    return best


def slurm_mem_bytes(mem: str) -> float:
    """``--mem`` as sbatch reads it: a number with an optional K/M/G/T suffix, megabytes by default."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt]?)[Bb]?\s*", mem)
    if not m:
        raise BudgetError(f"launcher.mem={mem!r} is not a Slurm memory size (e.g. 64G, 500M)")
    return float(m.group(1)) * 1024 ** "KMGT".index((m.group(2) or "M").upper()) * 1024


def memory_budget(cfg, nproc: int) -> Optional[Budget]:
    """The budget per rank for ``nproc`` ranks per node, or None where nothing can be known."""
    launcher, plan = cfg.launcher, cfg.plan
    host_override = None if plan.host_memory_gb is None else plan.host_memory_gb * GiB
    if launcher.name == "slurm":
        if launcher.gpus_per_node:
            per_gpu = max(1, -(-nproc // launcher.gpus_per_node))
            return Budget(plan.gpu_memory_gb * GiB / per_gpu, "cuda", per_gpu,
                          plan.gpu_memory_gb * GiB, "per GPU (plan.gpu_memory_gb; the job's nodes "
                          "are not visible from here)")
        if host_override is not None:
            return Budget(host_override / nproc, "cpu", nproc, host_override, "per node (plan.host_memory_gb)")
        if launcher.mem:
            total = slurm_mem_bytes(launcher.mem)
            return Budget(total / nproc, "cpu", nproc, total, f"per node (launcher.mem={launcher.mem})")
        return None
    import torch

    if torch.cuda.is_available():
        try:
            gpus = visible_gpus()
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            print(f"warning: memory plan: the GPUs could not be queried ({detail}); "
                  "checking against plan.gpu_memory_gb", file=sys.stderr)
            gpus = []
        if gpus:
            return gpu_budget(gpus, nproc)
        return Budget(plan.gpu_memory_gb * GiB, "cuda", 1, plan.gpu_memory_gb * GiB, "per GPU (plan.gpu_memory_gb)")
    if host_override is not None:
        return Budget(host_override / nproc, "cpu", nproc, host_override, "on this host (plan.host_memory_gb)")
    from orchestrator.plan import host_available

    total, source = host_available()
    return Budget(total / nproc, "cpu", nproc, total, source)


# -- the verdict -------------------------------------------------------------------------
def _useful(text: str, device: str) -> bool:
    """On CPU the host is the memory: offloading to it or more ranks on it does not help."""
    return device == "cuda" or not ("offload" in text or text.startswith("world size"))


def _need(peak: float, budget: Budget) -> str:
    if budget.ranks > 1:
        return f"{budget.ranks} ranks x {gb(peak)} = {gb(peak * budget.ranks)}"
    return gb(peak)


def check_memory(cfg, world: int, nproc: int, data=None) -> list[str]:
    """Lines to print (the plan within budget, or a warning); raises BudgetError when the plan
    does not fit and ``plan.enforce`` is on. ``data``: the prepared data's lengths (plan/lengths.py)."""
    from orchestrator.plan import PlanError, compute_bytes_for, plan_for_run, suggest

    budget = memory_budget(cfg, nproc)
    if budget is None:
        return []
    try:
        plan = plan_for_run(cfg, world, budget.device, compute_bytes_for(cfg.trainer.precision, budget.device),
                            data=data, ranks_per_node=nproc)
    except PlanError as exc:
        return [f"warning: memory plan unavailable ({exc}); launching without a memory check"]
    peak = plan.peak_bytes
    what = f"peak {_need(peak, budget)} ({plan.peak_phase.name})"
    if peak <= budget.per_rank * WARN_FRACTION:
        return [f"memory plan: {what} of {gb(budget.total)} {budget.source}"]
    if peak <= budget.per_rank:
        return [f"warning: memory plan: {what} is within {100 * (1 - WARN_FRACTION):.0f}% of "
                f"{gb(budget.total)} {budget.source}: the run may run out of memory"]
    over = f"does NOT fit: {what} exceeds {gb(budget.total)} {budget.source} by {gb((peak - budget.per_rank) * budget.ranks)}"
    if not cfg.plan.enforce:
        return [f"warning: memory plan {over}; launching anyway (plan.enforce=false)"]
    fixes = [s for s in suggest(plan.shape, plan.setup, budget.per_rank) if _useful(s.text, budget.device)]
    hint = ("; changes that fit: " + ", ".join(f"{s.text} ({gb(s.plan.peak_bytes)} per rank)" for s in fixes)
            if fixes else "; no change found that fits")
    raise BudgetError(f"memory plan {over}{hint}; `orchestrate plan` shows the table; "
                      "plan.enforce=false launches anyway")
