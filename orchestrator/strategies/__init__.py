"""Parallelism strategies behind one interface (see base.Strategy)."""

from __future__ import annotations

from ..distributed import DistInfo
from .base import Strategy


def build_strategy(cfg, dist: DistInfo) -> Strategy:
    """The strategy named by ``cfg.name``; imports only what that strategy needs."""
    if cfg.name == "ddp":
        from .ddp import DDPStrategy

        return DDPStrategy(cfg, dist)
    raise ValueError(f"strategy.name={cfg.name!r} is not implemented")


__all__ = ["Strategy", "build_strategy"]
