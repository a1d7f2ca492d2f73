"""Changes that would make a run fit: the single ones first, then the cheapest combination."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from .memory import Plan, plan_memory
from .setup import Setup
from .shapes import ModelShape

@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]
    plan: Plan

    @property
    def text(self) -> str:
        return " ".join(self.overrides)


Change = Callable[[Setup], Optional[tuple[tuple[str, ...], Setup]]]


def _checkpointing(s: Setup):
    if s.checkpointing:
        return None
    return ("model.gradient_checkpointing=true",), replace(s, checkpointing=True)


def _shard_zero3(s: Setup):
    if s.base_sharded:
        return None
    return ("strategy=deepspeed", "strategy.zero_stage=3"), replace(s, strategy="deepspeed", zero_stage=3)


def phase_total(plan: Plan, name: str) -> float:
    return next(p.total for p in plan.phases if p.name == name)


def _low_memory(s: Setup):
    if s.strategy == "fsdp" and s.shard_base and s.low_memory_load is False:
        return ("strategy.low_memory_load=true",), replace(s, low_memory_load=True)
    return None


def _shard_fsdp(s: Setup):
    if s.base_sharded:
        return None
    new = replace(s, strategy="fsdp", shard_base=True)
    return ("strategy=fsdp", "strategy.shard_base=true"), new


def _offload(s: Setup):
    if s.strategy == "fsdp" and not s.cpu_offload:
        return ("strategy.cpu_offload=true",), replace(s, cpu_offload=True)
    if s.strategy == "deepspeed" and not s.offload_optimizer:
        return ("strategy.offload_optimizer=true",), replace(s, offload_optimizer=True)
    return None


def _smaller(key: str, attr: str) -> Callable[[Setup, ModelShape, float], Optional[tuple]]:
    """The largest smaller power-of-two divisor of the current value that fits (else 1)."""
    def change(s: Setup, shape: ModelShape, limit: float):
        value = getattr(s, attr)
        candidates = [v for v in (value // 2 ** k for k in range(1, 12)) if v >= 1 and value % v == 0]
        for v in candidates:
            new = replace(s, **{attr: v})
            if plan_memory(shape, new, limit).fits:
                return (f"{key}={v}",), new
        return ((f"{key}=1",), replace(s, **{attr: 1})) if value > 1 else None
    return change


def _more_ranks(s: Setup, shape: ModelShape, limit: float):
    """The smallest world (doubling, up to 512 ranks) at which the current strategy fits."""
    if s.strategy == "ddp":
        return None  # DDP replicates everything: more ranks do not lower memory per rank
    world = s.world
    while world < 512:
        world *= 2
        new = replace(s, world=world)
        if plan_memory(shape, new, limit).fits:
            break
    if world == s.world:
        return None
    return (f"world size {world} (launcher.nproc_per_node x launcher.nodes)",), replace(s, world=world)


def suggest(shape: ModelShape, s: Setup, limit_bytes: float, max_items: int = 8) -> list[Suggestion]:
    """Changes that make the run fit: single changes first, then the cheapest combination.

    Order: what costs no speed or hardware (checkpointing, smaller micro/eval batch) before
    what costs communication (sharding the base, offload) or hardware (more ranks).
    """
    simple: list[Change] = [_checkpointing, _low_memory, _shard_fsdp, _shard_zero3, _offload]
    sized = [_smaller("trainer.micro_batch_size", "micro_batch"),
             _smaller("trainer.eval_batch_size", "eval_batch"), _more_ranks]

    def changes(cur: Setup):
        for fn in simple:
            out = fn(cur)
            if out:
                yield out
        for fn in sized:
            out = fn(cur, shape, limit_bytes)
            if out:
                yield out

    found: list[Suggestion] = []
    for overrides, new in changes(s):
        p = plan_memory(shape, new, limit_bytes)
        if p.fits:
            found.append(Suggestion(overrides, p))
    if found:
        return found[:max_items]
    # No single change is enough: combine greedily, each time taking the change that lowers
    # the peak most, until it fits or nothing helps.
    cur, combo = s, ()
    for _ in range(6):
        best = None
        for overrides, new in changes(cur):
            p = plan_memory(shape, new, limit_bytes)
            if best is None or p.peak_bytes < best[2].peak_bytes:
                best = (overrides, new, p)
        if best is None or best[2].peak_bytes >= plan_memory(shape, cur, limit_bytes).peak_bytes:
            break
        combo, cur = combo + best[0], best[1]
        if best[2].fits:
            return [Suggestion(combo, best[2])]
    return []
