"""What a run records about itself besides its metrics: the W&B run config, what each rank
holds, and the planned against the measured peak memory (summary.json carries them)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, to_container
from .distributed import DistInfo, all_gather_object
from .plan import MiB, PlanError, data_lengths, plan_for_run
from .runinfo import code_info, hardware, library_versions
from .strategies.mesh import local_world_size

log = logging.getLogger("orchestrator")


def run_record(cfg: RunConfig, run_dir: Path, dist: DistInfo, strategy: str) -> dict[str, Any]:
    """Config, overrides, code and machine, for W&B's run config (no environment, no secrets)."""
    import yaml

    overrides_file = run_dir / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    return {
        **to_container(cfg), "overrides": overrides, **code_info(),
        "versions": library_versions(), "hardware": hardware(dist.world_size, strategy),
    }


def report_holdings(strategy) -> list[dict]:
    """Gather and log what each rank holds locally (shows what the strategy shards)."""
    holdings = all_gather_object(strategy.holdings())
    if strategy.dist.is_main:
        for r, h in enumerate(holdings):
            log.info("rank %d holds: base %.2f MB, adapter %.2f MB, optimizer state %.2f MB", r,
                     h["base_bytes"] / 2**20, h["adapter_bytes"] / 2**20,
                     h["optimizer_bytes"] / 2**20)
    return holdings


def planned_peak_mb(cfg: RunConfig, dist: DistInfo, compute_dtype: torch.dtype, splits) -> float | None:
    """What the planner expects this rank's measured peak to be (None for shapes it cannot
    read), at the lengths of the data this run trains on: on CPU the process RSS, on CUDA the
    allocator peak (context excluded)."""
    try:
        plan = plan_for_run(cfg, dist.world_size, dist.device.type, compute_dtype.itemsize,
                            data=data_lengths(cfg, splits.train, splits.eval),
                            ranks_per_node=local_world_size())
    except PlanError as exc:
        if dist.is_main:
            log.warning("memory plan unavailable: %s", exc)
        return None
    return round(plan.measurable_bytes() / MiB, 1)


def log_memory(planned: float | None, peaks: list[float]) -> None:
    for r, measured in enumerate(peaks):
        if planned is None:
            log.info("rank %d peak memory: measured %.0f MB", r, measured)
        else:
            log.info("rank %d peak memory: planned %.0f MB, measured %.0f MB (%+.1f%%)", r, planned,
                     measured, 100.0 * (planned - measured) / measured)
