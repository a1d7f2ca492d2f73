"""Memory planner: bytes per rank for a run, from the model's config.json and the RunConfig.

No weights are loaded: shapes come from ``config.json``, and every term follows what this
project's code does with them (orchestrator/model.py, strategies/, train.py, evaluate.py), so
the plan can answer "will this fit?" before anything launches and can be checked against the
peak each run measures (train.py logs both).

What each term models, and why:
- 4-bit base: bitsandbytes packs two weights per byte; its constants are one absmax per block
  of 64 (fp32, or uint8 plus an fp32 per 256 blocks with double quantization): 0.5625 or
  0.51587 bytes per weight (FACTS.md). Every decoder Linear is quantized, the output head not.
- Non-quantized parameters (embeddings, norms, head, biases): ``prepare_model_for_kbit_training``
  casts them to fp32; without quantization they stay in the compute dtype.
- LoRA parameters, gradients and AdamW's two moments are fp32. DDP adds a gradient bucket copy
  (on more than one rank); FSDP2 shards all three; DeepSpeed (run in fp32 mode) keeps an fp32
  partition of the parameters and a gradient bucket of ``reduce_bucket_size`` (5e8) elements,
  allocated whole on GPU.
- Sharded bases (FSDP2 shard_base, ZeRO-3) hold 1/world of the base plus the gathered layers in
  flight (the current and the prefetched one). Loading is its own phase: ZeRO-3, and FSDP2 with
  ``strategy.low_memory_load=false``, load the whole 4-bit model on every rank before sharding
  it (transformers skips zero.Init for quantized models); FSDP2's low-memory loading has rank 0
  load it into host memory and sends each device only its shards.
- Activations are the tensors autograd saves per token of one decoder layer (see
  :func:`layer_activation_bytes`), times the layers, or only the layer inputs plus one layer
  recomputed under activation checkpointing; the loss adds bf16 logits, their fp32 copy and
  log-softmax and its gradients; autocast keeps a compute-dtype copy of the fp32 head weight.
  Sequences are planned at ``data.max_seq_len`` (the worst case; real batches pad only to their
  longest row).
- Evaluation (``trainer.eval_batch_size`` sequences, no gradients) is a phase too: its logits
  can exceed training's on large vocabularies.
- Framework overhead: on CUDA the context and communicator buffers, which the allocator peak
  does not see; on CPU the measured resident size of the runtime itself (interpreter, torch,
  transformers, bitsandbytes, DeepSpeed, gloo, kernels' caches) with a negligible model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

GiB = 2**30
MiB = 2**20

#: The Linear modules of one Llama-family decoder layer (Llama, Mistral, Qwen2 share them).
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: DeepSpeed's default reduce_bucket_size (elements); strategies/deepspeed.py does not change it.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
#: CUDA context plus NCCL buffers per rank, outside torch's allocator (typical for CUDA 12/13
#: on Hopper/Ampere: ~0.5 GiB context, ~0.25 GiB communicators).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
NCCL_BYTES = int(0.25 * GiB)
#: Peak RSS per rank of `orchestrate train` with a negligible model (hidden 64, 1 layer, 8
#: steps with evaluation), by strategy, less that model's own planned bytes (~7 MB): measured
#: by ``benchmarks/planner_accuracy.py --calibrate`` on the 2-core build machine (torch 2.13
#: CPU, 2 gloo ranks, the datasets/pyarrow data pipeline loaded; 627/629/655 MB). Override
#: with plan.overhead_gb elsewhere.
CPU_RUNTIME_BYTES = {
    "ddp": int(620 * MiB),
    "fsdp": int(622 * MiB),
    "deepspeed": int(648 * MiB),
}

#: Host allocator retention on CPU, as a fraction of a training step's transient bytes
#: (activations and logits), by strategy kind. glibc keeps freed activation memory in its heaps,
#: fragmented, and later steps grow the heaps instead of reusing it, so peak RSS exceeds the
#: live peak by an amount that scales with what a step allocates and frees, and with how the
#: strategy allocates (FSDP's all-gathers, ZeRO-3's parameter gathers add their own churn).
#: Fitted on one held-out model (~17M parameters, ``planner_accuracy.py --calibrate``) and
#: checked on the 3M and 50M models (benchmarks/RESULTS.md). Not applied on CUDA, where the
#: measured peak is the caching allocator's live bytes.
CPU_RETENTION = {
    "ddp": 0.47,
    "fsdp": 0.53,
    "fsdp shard_base": 0.79,
    "zero2": 0.65,
    "zero3": 1.51,
}
RETENTION = "host allocator retention (CPU)"


class PlanError(ValueError):
    """A model or config the planner cannot plan for; the message names what and why."""


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each Linear of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def quantized_params(self) -> int:
        """Weights of all decoder Linears (what bitsandbytes quantizes)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, output head (unless tied), norms and biases (left unquantized)."""
        n = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        n += self.hidden * (2 * self.layers + 1)
        if self.qkv_bias:
            n += self.layers * (self.q_dim + 2 * self.kv_dim)
        return n

    def total_params(self) -> int:
        return self.quantized_params() + self.other_params()


_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")


def read_shape(model_path: str) -> ModelShape:
    """The shape in ``model_path/config.json`` (a transformers model directory; no weights needed)."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        raise PlanError(f"model.path={model_path!r}: no config.json there to read the model's shape from")
    cfg = json.loads(cfg_file.read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}  # multimodal wrappers keep the LM shape inside
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise PlanError(f"{cfg_file}: missing {', '.join(missing)}; the planner reads decoder-only "
                        "(Llama/Mistral/Qwen-style) configs")
    heads = cfg["num_attention_heads"]
    return ModelShape(
        hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"], tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        name=cfg.get("_name_or_path") or Path(model_path).name,
    )


def lora_targets(shape: ModelShape, target_modules: list[str]) -> list[str]:
    """The decoder Linears LoRA attaches to (PEFT matches names by suffix; all-linear = all)."""
    if list(target_modules) == ["all-linear"]:
        return list(LAYER_LINEARS)
    unknown = [t for t in target_modules if t.split(".")[-1] not in LAYER_LINEARS]
    if unknown:
        raise PlanError(f"lora.target_modules={list(target_modules)!r}: the planner knows "
                        f"{', '.join(LAYER_LINEARS)} or [all-linear], not {unknown[0]!r}")
    return [t for t in LAYER_LINEARS if t in {x.split('.')[-1] for x in target_modules}]


def lora_params(shape: ModelShape, targets: list[str], r: int) -> int:
    lin = shape.linears()
    return shape.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)


def nf4_bytes(n: int, double_quant: bool, blocksize: int = 64) -> float:
    """Packed 4-bit weights plus quantization constants (bitsandbytes' layout)."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        return n / 2 + blocks + math.ceil(blocks / 256) * 4
    return n / 2 + blocks * 4


@dataclass(frozen=True)
class Setup:
    """What the planner needs from a RunConfig, flattened (so suggestions can vary it)."""

    strategy: str  # ddp | fsdp | deepspeed
    world: int
    device: str  # cuda | cpu
    compute_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    quant: str  # nf4 | fp4 | none
    double_quant: bool
    lora_r: int
    lora_dropout: float
    targets: tuple[str, ...]
    micro_batch: int
    seq_len: int
    eval_batch: int
    checkpointing: bool
    shard_base: bool = False  # fsdp
    zero_stage: int = 2  # deepspeed
    cpu_offload: bool = False  # fsdp
    offload_optimizer: bool = False  # deepspeed
    offload_params: bool = False  # deepspeed, zero 3
    # fsdp with shard_base: rank 0 loads the base into host memory and sends each rank its
    # shard, so no accelerator ever holds the whole model (None: the strategy lacks the option).
    low_memory_load: Optional[bool] = None
    overhead_bytes: Optional[int] = None

    @property
    def base_sharded(self) -> bool:
        return (self.strategy == "fsdp" and self.shard_base) or (
            self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def adapter_sharded(self) -> bool:
        """LoRA parameters themselves split across ranks (FSDP2 always, ZeRO-3)."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def kind(self) -> str:
        """The strategy as the CPU calibration tables name it."""
        if self.strategy == "fsdp":
            return "fsdp shard_base" if self.shard_base else "fsdp"
        if self.strategy == "deepspeed":
            return f"zero{self.zero_stage}"
        return self.strategy

    def describe(self) -> str:
        s = self.strategy
        if s == "fsdp":
            s += f" shard_base={str(self.shard_base).lower()}" + (" cpu_offload" if self.cpu_offload else "")
            s += " low_memory_load" if self.shard_base and self.low_memory_load else ""
        elif s == "deepspeed":
            s += f" zero_stage={self.zero_stage}" + (" offload_optimizer" if self.offload_optimizer else "")
            s += " offload_params" if self.offload_params else ""
        return s


def setup_from_config(cfg, world: int, device: str, compute_bytes: int, shape: ModelShape) -> Setup:
    """Flatten a RunConfig for the planner."""
    from .config import FSDPConfig  # what a suggestion to switch to FSDP would get

    st = cfg.strategy
    overhead = cfg.plan.overhead_gb
    return Setup(
        strategy=st.name, world=world, device=device, compute_bytes=compute_bytes,
        quant=cfg.quant.method, double_quant=cfg.quant.double_quant, lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout, targets=tuple(lora_targets(shape, cfg.lora.target_modules)),
        micro_batch=cfg.trainer.micro_batch_size, seq_len=cfg.data.max_seq_len,
        eval_batch=cfg.trainer.eval_batch_size if cfg.data.eval_path else 0,  # no eval set: no eval
        checkpointing=cfg.model.gradient_checkpointing,
        shard_base=getattr(st, "shard_base", False), zero_stage=getattr(st, "zero_stage", 2),
        cpu_offload=getattr(st, "cpu_offload", False),
        offload_optimizer=getattr(st, "offload_optimizer", False),
        offload_params=getattr(st, "offload_params", False),
        low_memory_load=getattr(st, "low_memory_load", getattr(FSDPConfig(), "low_memory_load", None)),
        overhead_bytes=None if overhead is None else int(overhead * GiB),
    )


def residual_bytes(s: Setup) -> int:
    """Bytes per element of the residual stream, Linear outputs and MLP tensors: fp32 around a
    quantized base (prepare_model_for_kbit_training keeps norms and embeddings in fp32), else
    the compute dtype."""
    return 4 if (s.quant != "none" or s.compute_bytes == 4) else s.compute_bytes


def layer_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """Bytes autograd saves per token for one decoder layer in training.

    Counted from the code path: RMSNorm saves its fp32 input; a frozen 4-bit Linear saves no
    activation (bitsandbytes keeps only the weight for the input gradient) and returns its
    input's dtype (fp32 after prepare_model_for_kbit_training); each LoRA branch saves its
    dropout mask, the compute-dtype input of lora_A and lora_A's output; SDPA saves q, k, v (k
    and v repeated to all heads when a padding mask is given) and its output; the SwiGLU MLP
    saves the gate input, SiLU output and up output. Checked against the tensors autograd
    really saves (tests/test_plan.py).
    """
    b = s.compute_bytes
    act = residual_bytes(s)
    lin = shape.linears()
    drop = s.lora_dropout > 0

    def lora(name: str) -> float:
        if name not in s.targets:
            return 0.0
        d_in = lin[name][0]
        in_bytes = b if name == "o_proj" else act  # o_proj reads the attention output
        # Dropout's mask: a bool on CUDA (fused kernel), a tensor of the input's dtype on CPU.
        mask = (1 if s.device == "cuda" else in_bytes) if drop else 0
        return mask * d_in + b * d_in + b * s.lora_r

    norms = 2 * 4 * shape.hidden
    attn = b * (4 * shape.q_dim) + 4 * shape.heads
    mlp = 3 * act * shape.intermediate
    return norms + attn + mlp + sum(lora(n) for n in LAYER_LINEARS)


def _head_copy_bytes(shape: ModelShape, s: Setup) -> float:
    """Autocast's compute-dtype copy of the fp32 output head, kept for the input gradient."""
    return shape.vocab * shape.hidden * s.compute_bytes if (s.quant != "none" and s.compute_bytes < 4) else 0.0


def _saved_loss_bytes(shape: ModelShape, s: Setup) -> float:
    """The fp32 log-softmax cross-entropy keeps, and the head copy."""
    return s.micro_batch * s.seq_len * shape.vocab * 4 + _head_copy_bytes(shape, s)


def saved_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """What autograd holds at the end of one micro-batch's forward (before backward starts)."""
    tokens = s.micro_batch * s.seq_len
    resid = residual_bytes(s)
    if s.checkpointing:  # only each layer's input survives the forward
        layers = shape.layers * resid * shape.hidden
    else:
        layers = shape.layers * layer_activation_bytes(shape, s)
    final_norm = 4 * shape.hidden
    mask = s.micro_batch * s.seq_len * s.seq_len  # the boolean 4-D attention mask
    return tokens * (layers + final_norm) + mask + _saved_loss_bytes(shape, s)


@dataclass
class Phase:
    name: str
    items: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    phases: list[Phase]
    limit_bytes: float
    lora_params: int

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak_bytes(self) -> float:
        return self.peak_phase.total

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.limit_bytes

    def measurable_bytes(self) -> float:
        """The part of the peak a run's own measurement sees: everything on CPU (process RSS);
        on CUDA the allocator peak, which excludes the context and communicator buffers."""
        phase = self.peak_phase
        if self.setup.device == "cuda":
            return phase.total - phase.items.get(OVERHEAD, 0.0)
        return phase.total


OVERHEAD = "framework overhead"


def _overhead(s: Setup) -> float:
    if s.overhead_bytes is not None:
        return float(s.overhead_bytes)
    if s.device == "cuda":
        return CUDA_CONTEXT_BYTES + (NCCL_BYTES if s.world > 1 else 0)
    return float(CPU_RUNTIME_BYTES[s.strategy])


def plan_memory(shape: ModelShape, s: Setup, limit_bytes: float) -> Plan:
    """Per-rank bytes in the load, train and eval phases of a run."""
    world = s.world
    b = s.compute_bytes
    quantized = s.quant != "none"
    n_q, n_o = shape.quantized_params(), shape.other_params()
    n_lora = lora_params(shape, list(s.targets), s.lora_r)
    base_full = nf4_bytes(n_q, s.double_quant) if quantized else n_q * b
    other_full = n_o * (4 if quantized else b)
    base_div = world if s.base_sharded else 1
    gpu_resident = not (s.cpu_offload or s.offload_params)  # sharded state lives in host memory

    persistent: dict[str, float] = {}
    label = "4-bit base (NF4 + constants)" if quantized else f"frozen base ({8 * b}-bit)"
    persistent[label] = base_full / base_div if gpu_resident or not s.base_sharded else 0.0
    persistent["non-quantized params (embeddings, norms, head)"] = (
        other_full / base_div if gpu_resident or not s.base_sharded else 0.0)
    lora_div = world if s.adapter_sharded else 1
    persistent["LoRA params (fp32)"] = 4 * n_lora / lora_div if gpu_resident else 0.0
    grads = 4 * n_lora
    optim = 8 * n_lora
    if s.strategy == "ddp":
        buckets = grads if world > 1 else 0.0
    elif s.strategy == "fsdp":
        grads, optim, buckets = grads / world, optim / world, 0.0
        if s.cpu_offload:
            grads = optim = 0.0
    else:  # deepspeed: fp32 partition of the params, partitioned grads and state, one bucket
        persistent["LoRA params (fp32)"] += 4 * n_lora / world  # ZeRO's fp32 partition copy
        grads, optim = grads / world, optim / world
        if s.offload_optimizer:
            optim = 0.0
            persistent["LoRA params (fp32)"] -= 4 * n_lora / world
        bucket_elems = DEEPSPEED_BUCKET_ELEMENTS if s.device == "cuda" else min(
            DEEPSPEED_BUCKET_ELEMENTS, n_lora)  # host pages are only touched as far as used
        buckets = 4.0 * bucket_elems
    persistent["gradients (fp32)"] = grads
    persistent["optimizer state (AdamW, fp32)"] = optim
    persistent["gradient buckets"] = buckets
    layer_base = (base_full / shape.layers) if s.base_sharded else 0.0
    persistent["gathered base layers (2 in flight)"] = 2 * layer_base * (1 - 1 / world) if world > 1 else 0.0

    tokens = s.micro_batch * s.seq_len
    resid = residual_bytes(s)
    # Backward working set: one layer's activation gradients, plus the layer being recomputed
    # under checkpointing.
    working = tokens * layer_activation_bytes(shape, s) * (2 if s.checkpointing else 1)
    acts = saved_activation_bytes(shape, s) - _saved_loss_bytes(shape, s) + working
    logits = tokens * shape.vocab * (b + 12) + _head_copy_bytes(shape, s)
    overhead = _overhead(s)

    train = Phase("train", dict(persistent))
    train.items["activations"] = acts
    train.items["logits + loss"] = logits
    if s.device == "cpu" and s.overhead_bytes is None:
        train.items[RETENTION] = CPU_RETENTION[s.kind] * (acts + logits)
    train.items[OVERHEAD] = overhead

    ev = Phase("eval", dict(persistent))
    ev.items["gradients (fp32)"] = 0.0  # set to None after every optimizer step
    eval_tokens = s.eval_batch * s.seq_len
    ev.items["activations"] = eval_tokens * (resid * shape.hidden * 2 + 3 * resid * shape.intermediate)
    ev.items["activations"] += eval_tokens * shape.layers * 2 * shape.kv_dim * b  # KV cache (generate)
    ev.items["logits + loss"] = eval_tokens * shape.vocab * (b + 8)
    ev.items[OVERHEAD] = overhead

    load = Phase("load")
    largest = max(shape.vocab * shape.hidden, max(a * c for a, c in shape.linears().values()))
    if s.strategy == "fsdp" and s.shard_base and s.low_memory_load and s.device == "cuda":
        # Rank 0 loads into host memory; each accelerator only ever receives its shards.
        load.items[label] = base_full / world
        load.items["non-quantized params (embeddings, norms, head)"] = other_full / world
    else:  # every rank (or, loading low-memory on CPU, rank 0) holds the whole model at first
        load.items[label] = base_full
        load.items["non-quantized params (embeddings, norms, head)"] = other_full + largest * b
    load.items[OVERHEAD] = overhead
    return Plan(shape, s, [load, train, ev], limit_bytes, n_lora)


# -- suggestions -------------------------------------------------------------------------
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


# -- report ------------------------------------------------------------------------------


def format_plan(plan: Plan, suggestions: Optional[list[Suggestion]] = None) -> str:
    """The per-rank table, the verdict and (when it does not fit) the changes that would."""
    s, shape = plan.setup, plan.shape
    lines = [
        f"model: {shape.name}  {shape.total_params() / 1e9:.2f}B params "
        f"({shape.quantized_params() / 1e9:.2f}B in decoder Linears, "
        f"{shape.other_params() / 1e9:.2f}B embeddings/norms/head)",
        f"run: strategy={s.describe()}, {s.world} rank(s), device={s.device}, "
        f"compute {8 * s.compute_bytes}-bit, quant={s.quant}"
        f"{' (double quant)' if s.quant != 'none' and s.double_quant else ''}",
        f"batch: micro {s.micro_batch} x seq {s.seq_len}, eval {s.eval_batch}; activation "
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
               f"{'GPU' if s.device == 'cuda' else 'rank'} (plan.gpu_memory_gb), "
               f"{(limit - peak.total) / GiB:.2f} GiB spare")
    if not plan.fits:
        verdict = (f"does NOT fit: peak {peak.total / GiB:.2f} GiB ({peak.name}) exceeds "
                   f"{limit / GiB:.2f} GiB (plan.gpu_memory_gb) by {(peak.total - limit) / GiB:.2f} GiB")
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


# -- from a RunConfig ---------------------------------------------------------------------
def compute_bytes_for(precision: str, device: str) -> int:
    """Bytes of the compute dtype ``trainer.precision`` resolves to on ``device``."""
    if precision in ("bf16", "fp16"):
        return 2
    if precision == "fp32":
        return 4
    if device == "cuda":
        return 2  # bf16 or fp16, whichever the GPU has
    import torch

    from .distributed import resolve_precision

    return resolve_precision(precision, torch.device("cpu")).itemsize


def plan_for_run(cfg, world: int, device: Optional[str] = None,
                 compute_bytes: Optional[int] = None) -> Plan:
    """The plan of ``cfg`` on ``world`` ranks (device and precision default to cfg.plan's)."""
    device = device or cfg.plan.device
    if compute_bytes is None:
        compute_bytes = compute_bytes_for(cfg.trainer.precision, device)
    shape = read_shape(cfg.model.path)
    setup = setup_from_config(cfg, world, device, compute_bytes, shape)
    return plan_memory(shape, setup, cfg.plan.gpu_memory_gb * GiB)


def report(cfg, world: int) -> tuple[str, bool]:
    """``orchestrate plan``'s text and whether the run fits."""
    plan = plan_for_run(cfg, world)
    sugg = [] if plan.fits else suggest(plan.shape, plan.setup, plan.limit_bytes)
    return format_plan(plan, sugg), plan.fits
