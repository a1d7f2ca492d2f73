"""Parallelism strategies behind one interface (see base.Strategy)."""

from __future__ import annotations

import torch

from ..distributed import DistInfo
from .base import BatchPlan, Strategy


def build_strategy(cfg, dist: DistInfo, compute_dtype: torch.dtype) -> Strategy:
    """The strategy named by ``cfg.name``; imports only what that strategy needs."""
    if cfg.name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(cfg, dist, compute_dtype)
    if cfg.name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dist, compute_dtype)
    if cfg.name == "deepspeed":
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, dist, compute_dtype)
    raise ValueError(f"strategy.name={cfg.name!r} is not implemented")


def needs_cpu_collectives(cfg) -> bool:
    """Whether the strategy ``cfg`` runs collectives on host tensors even on GPUs (decided before
    the process group exists, which must then carry a CPU backend too)."""
    return cfg.name == "fsdp" and bool(getattr(cfg, "cpu_offload", False))


__all__ = ["BatchPlan", "Strategy", "build_strategy", "needs_cpu_collectives"]
