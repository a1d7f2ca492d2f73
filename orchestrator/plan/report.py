"""The planner from a RunConfig, and ``orchestrate plan``'s text: the per-rank table, the verdict
and the changes that would fit."""

from __future__ import annotations

from typing import Optional

from ..config import is_auto
from .auto import AutoChoice, choose, memory_budget
from .lengths import DataLengths
from .memory import OVERHEAD, Plan, plan_memory
from .setup import compute_bytes_for, setup_from_config
from .shapes import GiB, MiB, read_shape
from .suggest import Suggestion, _shard_fsdp, phase_total, suggest

def format_plan(plan: Plan, suggestions: Optional[list[Suggestion]] = None) -> str:
    """The per-rank table, the verdict and (when it does not fit) the changes that would."""
    s, shape = plan.setup, plan.shape
    data_note = (f"longest row drawn, data.max_seq_len={s.seq_len}" if s.train_width < s.seq_len
                 else "rows at data.max_seq_len")
    lines = [
        f"model: {shape.name}  {shape.total_params() / 1e9:.2f}B params "
        f"({shape.quantized_params() / 1e9:.2f}B in decoder Linears, "
        f"{shape.other_params() / 1e9:.2f}B embeddings/norms/head"
        f"{f', {shape.expert_params() / 1e9:.2f}B in {shape.experts} experts per layer, not quantized' if shape.experts else ''})",
        f"run: strategy={s.describe()}, {s.world} rank(s), device={s.device}"
        f"{f' (host malloc: {s.host_allocator})' if s.device == 'cpu' else ''}, "
        f"compute {8 * s.compute_bytes}-bit, quant={s.quant}"
        f"{' (double quant)' if s.quant != 'none' and s.double_quant else ''}",
        f"batch: micro {s.micro_batch} x seq {s.train_width}"
        f"{'' if s.train_len is None else f' (the data: {data_note})'}, eval {s.eval_batch}; activation "
        f"checkpointing {'on' if s.checkpointing else 'off'}; LoRA r={s.lora_r} on "
        f"{len(s.targets)} module(s)/layer = {plan.lora_params / 1e6:.1f}M params",
        "",
    ]
    unit, div = ("MiB", MiB) if plan.peak_bytes < 2 * GiB else ("GiB", GiB)
    lines.append(f"{f'memory per rank ({unit}), every rank alike':50s}"
                 + "".join(f"{p.name:>9s}" for p in plan.phases))

    def cell(x: float) -> str:
        return f"{x / div:9.2f}"

    names: list[str] = []
    for p in sorted(plan.phases, key=lambda p: p.name != "train"):
        names += [n for n in p.items if n not in names and n != OVERHEAD]
    names.append(OVERHEAD)
    for n in names:
        vals = [p.items.get(n) for p in plan.phases]
        if all(not v for v in vals):
            continue
        lines.append(f"  {n:48s}" + "".join(cell(v) if v is not None else f"{'-':>9s}" for v in vals))
    lines.append(f"  {'total':48s}" + "".join(cell(p.total) for p in plan.phases))
    lines.append("")
    peak = plan.peak_phase
    limit = plan.limit_bytes
    verdict = (f"fits: peak {peak.total / GiB:.2f} GiB ({peak.name}) of {limit / GiB:.2f} GiB per "
               f"{'GPU' if s.device == 'cuda' else 'rank'} ({plan.budget}), "
               f"{(limit - peak.total) / GiB:.2f} GiB spare")
    if not plan.fits:
        verdict = (f"does NOT fit: peak {peak.total / GiB:.2f} GiB ({peak.name}) exceeds "
                   f"{limit / GiB:.2f} GiB ({plan.budget}) by {(peak.total - limit) / GiB:.2f} GiB")
    lines.append(verdict)
    if not plan.fits:
        if suggestions:
            lines.append("changes that fit:")
            for sug in suggestions:
                lines.append(f"  {sug.text:70s} -> peak {sug.plan.peak_bytes / GiB:.2f} GiB "
                             f"({sug.plan.peak_phase.name})")
        else:
            lines.append("no change found that fits: use GPUs with more memory or a smaller model")
        sharded = plan if s.base_sharded else plan_memory(shape, _shard_fsdp(s)[1], limit)
        load_total = phase_total(sharded, "load")
        if phase_total(sharded, "train") <= limit < load_total:
            lines.append(
                f"note: with the base sharded, training needs {phase_total(sharded, 'train') / GiB:.2f} "
                f"GiB per rank, but every rank first loads the whole 4-bit model "
                f"({load_total / GiB:.2f} GiB) before sharding it"
                + ("; strategy.low_memory_load=true loads it once, on the host"
                   if s.low_memory_load is False else ""))
    return "\n".join(lines)


def _inputs(cfg, world: int, device: Optional[str], compute_bytes: Optional[int],
            data: Optional[DataLengths], ranks_per_node: Optional[int]):
    device = device or cfg.plan.device
    if compute_bytes is None:
        compute_bytes = compute_bytes_for(cfg.trainer.precision, device)
    shape = read_shape(cfg.model.path)
    setup = setup_from_config(cfg, world, device, compute_bytes, shape, data, ranks_per_node)
    limit, budget = memory_budget(cfg, device, ranks_per_node or world)
    return shape, setup, limit, budget


def resolve_auto(cfg, world: int, device: Optional[str] = None, data: Optional[DataLengths] = None,
                 ranks_per_node: Optional[int] = None,
                 budget_per_rank: Optional[tuple[float, str]] = None) -> AutoChoice:
    """The fastest micro-batch size / checkpointing for ``cfg``'s ``auto`` settings (auto.py).

    ``budget_per_rank``: (bytes, where they come from) that the ranks will really have, as the
    launcher measured them (the free memory of the GPUs it sees); without it, the plan's own
    budget (``plan.gpu_memory_gb``, or on CPU the host's available memory)."""
    shape, setup, limit, budget = _inputs(cfg, world, device, None, data, ranks_per_node)
    if budget_per_rank is not None:
        limit, budget = budget_per_rank
    return choose(shape, setup, limit, cfg.trainer.global_batch_size // world,
                  cfg.trainer.micro_batch_size, cfg.model.gradient_checkpointing, budget)


def plan_for_run(cfg, world: int, device: Optional[str] = None, compute_bytes: Optional[int] = None,
                 data: Optional[DataLengths] = None, ranks_per_node: Optional[int] = None) -> Plan:
    """The plan of ``cfg`` on ``world`` ranks (device and precision default to cfg.plan's), at
    the data's real lengths when ``data`` is given (lengths.py), else at data.max_seq_len.
    ``auto`` settings are planned at the setting they would resolve to."""
    shape, setup, limit, budget = _inputs(cfg, world, device, compute_bytes, data, ranks_per_node)
    if is_auto(cfg.trainer.micro_batch_size) or is_auto(cfg.model.gradient_checkpointing):
        return choose(shape, setup, limit, cfg.trainer.global_batch_size // world,
                      cfg.trainer.micro_batch_size, cfg.model.gradient_checkpointing, budget).plan
    return plan_memory(shape, setup, limit, budget)


def report(cfg, world: int, data: Optional[DataLengths] = None,
           ranks_per_node: Optional[int] = None) -> tuple[str, bool]:
    """``orchestrate plan``'s text and whether the run fits."""
    head = ""
    if is_auto(cfg.trainer.micro_batch_size) or is_auto(cfg.model.gradient_checkpointing):
        choice = resolve_auto(cfg, world, data=data, ranks_per_node=ranks_per_node)
        plan, head = choice.plan, choice.describe() + "\n"
    else:
        plan = plan_for_run(cfg, world, data=data, ranks_per_node=ranks_per_node)
    sugg = [] if plan.fits else suggest(plan.shape, plan.setup, plan.limit_bytes)
    return head + format_plan(plan, sugg), plan.fits
