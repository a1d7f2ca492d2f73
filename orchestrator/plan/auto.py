"""``trainer.micro_batch_size=auto`` and ``model.gradient_checkpointing=auto``: the fastest
setting whose planned peak fits the memory budget.

Order, fastest first: checkpointing off before on, and within each the larger micro-batch
first. Checkpointing recomputes every decoder layer's forward in the backward pass; with a
frozen 4-bit base a step costs ~2N FLOPs per token forward and ~2N backward (input gradients
only), so the recompute adds ~50% of the work (measured: 1.28x slower on CPU, issue #14's
table; benchmarks/RESULTS.md). A larger micro-batch does the same FLOPs per global batch in
fewer, larger matmuls: it helps where small ones leave the device idle, but less than
checkpointing costs once a micro-batch holds a few hundred tokens. So the largest micro-batch
that fits without checkpointing wins; checkpointing is turned on only when no micro-batch
size fits without it.

Micro-batch candidates divide the per-rank batch (``global_batch_size / world``), so the
global batch, and with it the loss normalisation and what each step trains on, never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..config import is_auto
from .memory import Plan, plan_memory
from .setup import Setup
from .shapes import GiB, ModelShape, PlanError


@dataclass(frozen=True)
class AutoChoice:
    micro_batch: int
    checkpointing: bool
    plan: Plan
    budget: str  # where the limit came from, for the message
    tried: tuple[tuple[int, bool, float], ...] = ()  # faster candidates that did not fit

    def describe(self) -> str:
        peak = self.plan.peak_bytes / GiB
        line = (f"auto: trainer.micro_batch_size={self.micro_batch} model.gradient_checkpointing="
                f"{str(self.checkpointing).lower()}: planned peak {peak:.2f} GiB per rank "
                f"({self.plan.peak_phase.name}) of {self.plan.limit_bytes / GiB:.2f} GiB ({self.budget})")
        if self.tried:
            m, c, p = self.tried[-1]
            line += (f"; the next faster, micro {m} with checkpointing {'on' if c else 'off'}, "
                     f"plans {p / GiB:.2f} GiB")
        return line


def candidates(per_rank: int, micro, checkpointing) -> list[tuple[int, bool]]:
    """(micro-batch, checkpointing) pairs, fastest first (module docstring)."""
    micros = [m for m in range(per_rank, 0, -1) if per_rank % m == 0] if is_auto(micro) else [micro]
    ckpts = [False, True] if is_auto(checkpointing) else [bool(checkpointing)]
    return [(m, c) for c in ckpts for m in micros]


def choose(shape: ModelShape, setup: Setup, limit_bytes: float, per_rank: int, micro,
           checkpointing, budget: str) -> AutoChoice:
    """The first candidate that fits; PlanError naming the smallest plan when none does."""
    tried: list[tuple[int, bool, float]] = []
    for m, c in candidates(per_rank, micro, checkpointing):
        plan = plan_memory(shape, replace(setup, micro_batch=m, checkpointing=c), limit_bytes, budget)
        if plan.fits:
            return AutoChoice(m, c, plan, budget, tuple(tried))
        tried.append((m, c, plan.peak_bytes))
    m, c, peak = min(tried, key=lambda t: t[2])
    keys = [k for k, v in (("trainer.micro_batch_size", micro),
                           ("model.gradient_checkpointing", checkpointing)) if is_auto(v)]
    raise PlanError(
        f"{'='.join([' and '.join(keys), 'auto'])}: no setting fits {limit_bytes / GiB:.2f} GiB per "
        f"rank ({budget}); the smallest, micro-batch {m} with checkpointing {'on' if c else 'off'}, "
        f"plans {peak / GiB:.2f} GiB (see orchestrate plan for what else would fit)"
    )


def _cgroup_available() -> Optional[float]:
    """Bytes this process's cgroup (v2) may still allocate, or None without a limit."""
    try:
        line = next(ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::"))
        base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text())
        stat = dict(ln.split() for ln in (base / "memory.stat").read_text().splitlines())
        return float(int(limit) - used + int(stat.get("inactive_file", 0)))  # page cache is reclaimable
    except (OSError, StopIteration, ValueError):
        return None


def host_available() -> tuple[float, str]:
    """Memory new processes on this host can take: MemAvailable, or the cgroup's room if less."""
    avail = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = float(line.split()[1]) * 1024
    cgroup = _cgroup_available()
    if cgroup is not None and (avail is None or cgroup < avail):
        return cgroup, "available to this cgroup"
    if avail is None:
        raise OSError("/proc/meminfo has no MemAvailable")
    return avail, "available host memory (MemAvailable)"


def memory_budget(cfg, device: str, ranks_per_node: int) -> tuple[float, str]:
    """Bytes one rank may use, and where that figure comes from: plan.gpu_memory_gb on GPUs;
    on CPU plan.host_memory_gb, else this host's available memory shared by its ranks."""
    if device == "cuda":
        return cfg.plan.gpu_memory_gb * GiB, "plan.gpu_memory_gb"
    host = getattr(cfg.plan, "host_memory_gb", None)
    ranks = max(1, ranks_per_node)
    if host is not None:  # for the ranks of one node, as the preflight check reads it
        return host * GiB / ranks, f"plan.host_memory_gb={host:g} GiB / {ranks} rank(s) per node"
    avail, source = host_available()
    return avail / ranks, f"{source} {avail / GiB:.1f} GiB / {ranks} rank(s) per node"
