"""Bytes each rank sends per optimizer step, split into intra-node and inter-node traffic, and a
lower bound on the time they take, per strategy and job shape.

Why it matters: on a multi-node job the strategy decides what crosses the slow inter-node
network every step. Sharding a 4-bit 70B base over all 64 ranks of 8 nodes all-gathers ~35 GB of
packed weights per micro-batch across nodes; HSDP keeps those gathers inside a node and sends
only the adapter's gradients across. The model below is the strategies' collectives as they run
(checked against counted traffic, ``orchestrator/commcount.py``, in tests/test_strategies.py):

- DDP: one all-reduce of the fp32 adapter gradients per optimizer step (``no_sync`` while
  accumulating).
- FSDP2: per micro-batch an all-gather of each unit's sharded parameters in the forward and
  again in the backward (``reshard_after_forward``; once without it): the adapter always, the
  packed 4-bit base and the unquantized embeddings/norms/head too with ``shard_base``; one
  reduce-scatter of the adapter gradients per optimizer step.
- HSDP: the same inside each shard group (a node), plus one all-reduce of each rank's gradient
  shard across the replica groups (the only inter-node traffic).
- ZeRO-2: an all-reduce of the adapter gradients every micro-batch (DeepSpeed reduces at each
  backward), and an all-gather of the updated adapter after the step.
- ZeRO-3: DeepSpeed partitions every parameter, the packed 4-bit base included (bf16 storage, 4
  weights per element), and gathers each by its size and place in the module trace
  (deepspeed/runtime/zero/; ``zero3_tensors`` lists the parameters as it sees them):
  - at most ``stage3_param_persistence_threshold`` elements (1e5): *persistent*, gathered once
    per step, after the optimizer step (``stage3.py: _post_step``), and never released before
    the next one (``partitioned_param_coordinator.py: __params_to_release`` skips them);
  - larger: gathered for each micro-batch's forward and kept for its backward if the module trace
    reaches the backward use within ``stage3_max_reuse_distance`` elements (1e9), else released
    after the forward and gathered again (``__params_to_release``): a large model re-gathers all
    but its last layers. A run that evaluates before training re-gathers them all, whatever the
    size: ``__params_to_release`` is an ``lru_cache`` keyed by trace position and never cleared,
    and its answers for the forward's positions were first given while the trace was the
    evaluation's forward-only one (eval and training share one trace), where nothing is used
    again;
  - a reduce-scatter of the adapter gradients every micro-batch.
  Counted on 2 ranks, 2 micro-batches, the ~50M model: 58,517,056 bytes per step with the
  evaluation first (the plan is 0.5% over: the first layer's q_proj gets an input that needs no
  gradient, so the backward never gathers it again), 35,219,008 without (the plan, but for the
  loop's 64 bytes of scalars); the tiny model's parameters are all persistent (exact too).

Per-rank wire bytes use ring algorithms (``commcount.wire_bytes``). A collective whose group spans
nodes is counted as inter-node traffic: it runs no faster than the inter-node links, so
``time >= max(intra / intra bandwidth, inter / inter bandwidth)`` is a lower bound; hierarchical
algorithms (NCCL trees) change constants, not which strategy sends what across nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..commcount import wire_bytes
from .shapes import ModelShape, lora_params

#: DeepSpeed's default stage3_param_persistence_threshold: a parameter of at most this many
#: elements stays gathered from one optimizer step to the next.
ZERO3_PARAM_PERSISTENCE_THRESHOLD = 100_000
#: DeepSpeed's default stage3_max_reuse_distance: a parameter whose next use lies more elements
#: of the module trace ahead is released after its forward.
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000
GB = 1e9


@dataclass(frozen=True)
class JobShape:
    world: int
    ranks_per_node: int
    accumulation: int  # micro-batches per optimizer step on each rank

    @property
    def nodes(self) -> int:
        return max(1, math.ceil(self.world / max(self.ranks_per_node, 1)))


@dataclass(frozen=True)
class Sizes:
    """What gets communicated, in bytes (full, unsharded tensors)."""

    adapter: float  # LoRA parameters (fp32), also their gradients
    base_packed: float  # the 4-bit base's packed weights (quantization constants stay local)
    unquantized: float  # embeddings, norms, head (fp32 after k-bit preparation)
    adapter_gather: float = 0.0  # adapter as all-gathered (compute dtype under mixed precision)
    unquantized_gather: float = 0.0
    zero3_persistent: float = 0.0  # of all three, what ZeRO-3 keeps gathered between steps
    zero3_far: float = 0.0  # ... and what it releases after the forward (stage3_max_reuse_distance)

    @property
    def full(self) -> float:
        return self.adapter + self.base_packed + self.unquantized


@dataclass
class Collective:
    what: str
    group: str  # world | shard group | replica group
    ranks: int
    spans_nodes: bool
    bytes_per_rank: float  # sent per optimizer step


@dataclass
class CommPlan:
    strategy: str
    shape: JobShape
    collectives: list[Collective] = field(default_factory=list)

    @property
    def intra(self) -> float:
        return sum(c.bytes_per_rank for c in self.collectives if not c.spans_nodes)

    @property
    def inter(self) -> float:
        return sum(c.bytes_per_rank for c in self.collectives if c.spans_nodes)

    def seconds(self, intra_gb_per_s: float, inter_gbit_per_s: float) -> float:
        """Lower bound on communication time per step (intra and inter links run in parallel)."""
        return max(self.intra / (intra_gb_per_s * GB), self.inter / (inter_gbit_per_s * GB / 8))


def _add(plan: CommPlan, what: str, kind: str, full: float, count: float, group: str,
         ranks: int, spans: bool) -> None:
    if ranks > 1 and full > 0 and count > 0:
        plan.collectives.append(Collective(what, group, ranks, spans, count * wire_bytes(kind, full, ranks)))


def comm_plan(strategy: str, shape: JobShape, sizes: Sizes, *, shard_base: bool = False,
              replicate: int = 1, reshard_after_forward: bool = True, zero_stage: int = 2,
              evaluates_first: bool = True) -> CommPlan:
    """The collectives one optimizer step runs under ``strategy`` on ``shape``
    (``evaluates_first``: the run evaluates before its first step, which ZeRO-3's gathers feel)."""
    plan = CommPlan(strategy, shape)
    n, A, multi = shape.world, shape.accumulation, shape.nodes > 1
    if strategy == "ddp":
        _add(plan, "adapter gradients (all-reduce)", "all_reduce", sizes.adapter, 1, "world", n, multi)
    elif strategy == "fsdp":
        groups = replicate or shape.nodes
        shard = n // max(groups, 1)
        shard_spans = shard > shape.ranks_per_node or (groups == 1 and multi)
        passes = A * (2 if reshard_after_forward else 1)
        gather = sizes.adapter_gather or sizes.adapter
        _add(plan, "adapter (all-gather, forward+backward)", "all_gather", gather, passes,
             "shard group" if groups > 1 else "world", shard, shard_spans)
        if shard_base:
            base = sizes.base_packed + (sizes.unquantized_gather or sizes.unquantized)
            _add(plan, "4-bit base + embeddings/norms (all-gather)", "all_gather", base, passes,
                 "shard group" if groups > 1 else "world", shard, shard_spans)
        _add(plan, "adapter gradients (reduce-scatter)", "reduce_scatter", sizes.adapter, 1,
             "shard group" if groups > 1 else "world", shard, shard_spans)
        if groups > 1:
            _add(plan, "gradient shard (all-reduce across replicas)", "all_reduce",
                 sizes.adapter / shard, 1, "replica group", groups, multi)
    elif strategy == "deepspeed" and zero_stage == 2:
        _add(plan, "adapter gradients (all-reduce, every micro-batch)", "all_reduce", sizes.adapter,
             A, "world", n, multi)
        _add(plan, "updated adapter (all-gather)", "all_gather", sizes.adapter, 1, "world", n, multi)
    elif strategy == "deepspeed":
        others = sizes.full - sizes.zero3_persistent
        regathered = others if evaluates_first else sizes.zero3_far
        _add(plan, "persistent parameters (all-gather, after the step)", "all_gather",
             sizes.zero3_persistent, 1, "world", n, multi)
        _add(plan, "parameters kept for the backward (all-gather, fwd)", "all_gather",
             others - regathered, A, "world", n, multi)
        _add(plan, "parameters incl. 4-bit base (all-gather, fwd+bwd)", "all_gather",
             regathered, 2 * A, "world", n, multi)
        _add(plan, "adapter gradients (reduce-scatter, every micro-batch)", "reduce_scatter",
             sizes.adapter, A, "world", n, multi)
    else:
        raise ValueError(f"no communication model for strategy={strategy!r}")
    return plan


def zero3_tensors(shape: ModelShape, targets: list[str], r: int, quantized: bool = True,
                  compute_bytes: int = 2) -> list[tuple[int, float]]:
    """(elements, bytes) of each parameter as ZeRO-3 partitions it, in the forward's order: a
    4-bit Linear's packed bytes held as bf16 elements (4 weights each; quant=none: the weights in
    the compute dtype), LoRA A and B, norms, biases and embeddings in fp32. DeepSpeed's
    persistence and reuse rules count elements; the wire carries bytes."""
    def fp32(n: int) -> tuple[int, float]:
        return n, n * 4.0

    biases = {"q_proj": shape.q_dim, "k_proj": shape.kv_dim, "v_proj": shape.kv_dim}
    biases = biases if shape.qkv_bias else {}
    embeddings = fp32(shape.vocab * shape.hidden)
    out = [embeddings]
    for _ in range(shape.layers):
        for name, (fan_in, fan_out) in shape.linears().items():
            if name in ("q_proj", "gate_proj"):
                out.append(fp32(shape.hidden))  # the norm before attention / before the MLP
            n = fan_in * fan_out
            out.append(((n + 3) // 4, n / 2) if quantized else (n, float(n * compute_bytes)))
            if name in biases:
                out.append(fp32(biases[name]))
            if name in targets:
                out += [fp32(r * fan_in), fp32(fan_out * r)]
    out.append(fp32(shape.hidden))  # final norm
    if not shape.tie_embeddings:
        out.append(embeddings)
    return out


def zero3_split(tensors: list[tuple[int, float]],
                threshold: int = ZERO3_PARAM_PERSISTENCE_THRESHOLD,
                reuse_distance: int = ZERO3_MAX_REUSE_DISTANCE) -> tuple[float, float]:
    """(persistent bytes, bytes released after the forward) of ``tensors`` in forward order.
    Persistent: ``ds_numel <= threshold``. Released: the trace between a parameter's forward and
    its backward use holds the rest of the forward and the start of the backward, twice the
    elements used after it, and DeepSpeed stops looking for a reuse after ``reuse_distance``."""
    persistent = far = 0.0
    after = sum(n for n, _ in tensors)
    for n, b in tensors:
        after -= n
        if n <= threshold:
            persistent += b
        elif 2 * after >= reuse_distance:
            far += b
    return persistent, far


def sizes_for(shape: ModelShape, targets: list[str], r: int, quantized: bool = True,
              compute_bytes: int = 2, mixed_precision: bool = False) -> Sizes:
    """Byte sizes of the model with LoRA rank ``r`` on ``targets`` (quant=none: the base is stored
    in the compute dtype)."""
    quantized_params, unquantized_params = shape.quantized_params(), shape.other_params()
    adapter_params = lora_params(shape, targets, r)
    packed = quantized_params / 2 if quantized else quantized_params * compute_bytes
    gather_bytes = compute_bytes if mixed_precision else 4
    persistent, far = zero3_split(zero3_tensors(shape, targets, r, quantized, compute_bytes))
    return Sizes(
        adapter=adapter_params * 4.0, base_packed=float(packed), unquantized=unquantized_params * 4.0,
        adapter_gather=adapter_params * float(gather_bytes),
        unquantized_gather=unquantized_params * float(gather_bytes),
        zero3_persistent=persistent, zero3_far=far,
    )


def format_comm(plan: CommPlan, intra_gb_per_s: float, inter_gbit_per_s: float,
                compute_s: float | None = None) -> str:
    s = plan.shape
    lines = [f"communication per optimizer step and rank ({s.nodes} node(s) x {s.ranks_per_node} "
             f"ranks, {s.accumulation} micro-batch(es) per step):"]
    for c in plan.collectives:
        where = "inter-node" if c.spans_nodes else "intra-node"
        lines.append(f"  {c.what:52s} {c.group:>13s} x{c.ranks:<4d} {where:10s} {c.bytes_per_rank / GB:10.3f} GB")
    if not plan.collectives:
        lines.append("  (none: a single rank)")
    t = plan.seconds(intra_gb_per_s, inter_gbit_per_s)
    lines.append(f"  {'total':52s} intra {plan.intra / GB:.3f} GB, inter {plan.inter / GB:.3f} GB; "
                 f">= {t * 1e3:.1f} ms at {intra_gb_per_s:g} GB/s intra, {inter_gbit_per_s:g} Gb/s inter")
    if compute_s is not None:
        lines.append(f"  compute at peak FLOP/s (lower bound): {compute_s * 1e3:.1f} ms per step")
    return "\n".join(lines)


def comm_plan_for_run(cfg, world: int, ranks_per_node: int) -> CommPlan:
    """The communication plan of a RunConfig on ``world`` ranks, ``ranks_per_node`` per node."""
    from ..config import accumulation_steps
    from .setup import has_eval
    from .shapes import lora_targets, read_shape

    shape = read_shape(cfg.model.path)
    st = cfg.strategy
    compute = 4 if cfg.trainer.precision == "fp32" else 2
    sizes = sizes_for(shape, lora_targets(shape, cfg.lora.target_modules), cfg.lora.r,
                      quantized=cfg.quant.method != "none", compute_bytes=compute,
                      mixed_precision=bool(getattr(st, "mixed_precision", False)))
    job = JobShape(world=world, ranks_per_node=ranks_per_node,
                   accumulation=accumulation_steps(cfg, world))
    return comm_plan(st.name, job, sizes, shard_base=bool(getattr(st, "shard_base", False)),
                     replicate=getattr(st, "replicate", 1),
                     reshard_after_forward=bool(getattr(st, "reshard_after_forward", True)),
                     zero_stage=getattr(st, "zero_stage", 2),
                     evaluates_first=has_eval(cfg, None))


def compute_seconds(cfg, world: int, peak_tflops: float) -> float:
    """Lower bound on a step's compute per rank: 6 FLOPs per parameter and token (8 with
    activation checkpointing's second forward) at the device's peak."""
    from .shapes import read_shape

    shape = read_shape(cfg.model.path)
    tokens = cfg.trainer.global_batch_size * cfg.data.max_seq_len / max(world, 1)
    per_token = (8 if cfg.model.gradient_checkpointing else 6) * shape.total_params()
    return tokens * per_token / (peak_tflops * 1e12)
