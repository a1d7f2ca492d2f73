"""Which strategy to run a job with: among those whose memory plan fits, the one that spends the
least time communicating per step (a lower bound, comm.py), then the one with the most memory to
spare. Memory alone would pick ZeRO-3 or a fully sharded base far too often: on a multi-node job
they all-gather the base across nodes at every micro-batch, which HSDP or DDP avoid."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from .comm import comm_plan_for_run
from .report import plan_for_run
from .shapes import PlanError


@dataclass
class Option:
    overrides: str
    fits: bool
    peak_bytes: float
    comm_s: float


def _candidates(cfg, world: int, ranks_per_node: int) -> list[tuple[str, object]]:
    from ..config import DDPConfig, DeepSpeedConfig, FSDPConfig

    out = [("strategy=ddp", DDPConfig()), ("strategy=fsdp", FSDPConfig(replicate=1)),
           ("strategy=fsdp strategy.shard_base=true strategy.replicate=1",
            FSDPConfig(shard_base=True, replicate=1))]
    nodes = max(1, world // max(ranks_per_node, 1))
    if nodes > 1:
        out.append((f"strategy=fsdp strategy.shard_base=true (HSDP: {nodes} replicas x "
                    f"{world // nodes} shards)", FSDPConfig(shard_base=True, replicate=0)))
    out += [("strategy=deepspeed strategy.zero_stage=2", DeepSpeedConfig(zero_stage=2)),
            ("strategy=deepspeed strategy.zero_stage=3", DeepSpeedConfig(zero_stage=3))]
    return out


def options(cfg, world: int, ranks_per_node: int) -> list[Option]:
    p = cfg.plan
    out = []
    for text, strategy in _candidates(cfg, world, ranks_per_node):
        variant = copy.deepcopy(cfg)
        variant.strategy = strategy
        try:
            mem = plan_for_run(variant, world, ranks_per_node=ranks_per_node)
            comm = comm_plan_for_run(variant, world, ranks_per_node)
        except (PlanError, ValueError):
            continue
        out.append(Option(text, mem.fits, mem.peak_bytes,
                          comm.seconds(p.intra_node_gb_per_s, p.inter_node_gbit_per_s)))
    return out


def recommend(cfg, world: int, ranks_per_node: int) -> Optional[Option]:
    fitting = [o for o in options(cfg, world, ranks_per_node) if o.fits]
    return min(fitting, key=lambda o: (round(o.comm_s, 4), o.peak_bytes)) if fitting else None
