"""The memory model: bytes per rank in the load, train and eval phases of a run.

No weights are loaded: shapes come from ``config.json``, and every term follows what this
project's code does with them (orchestrator/model.py, strategies/, train.py, evaluate.py), so
the plan can answer "will this fit?" before anything launches and can be checked against the
peak each run measures (train.py logs both).

What each term models, and why:
- 4-bit base: bitsandbytes packs two weights per byte; its constants are one absmax per block
  of 64 (fp32, or uint8 plus an fp32 per 256 blocks with double quantization): 0.5625 or
  0.51587 bytes per weight (FACTS.md). Every decoder Linear is quantized, the output head not.
- Non-quantized parameters (embeddings, norms, head, biases): in the compute dtype, or fp32 with
  ``quant.frozen_dtype=fp32`` (PEFT's ``prepare_model_for_kbit_training`` cast).
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
  recomputed under activation checkpointing. The plain loss adds the compute-dtype logits,
  their fp32 copy, log-softmax and its gradients; the chunked one (the default) one chunk of
  ``CHUNK_ELEMENTS`` logits in fp32 (plus its compute-dtype copy in bf16) and the hidden
  states' gradient it computes in the forward. Autocast keeps a compute-dtype copy of an fp32
  head weight.
  Sequences are planned at the longest micro-batch the run will really form (lengths.py: the
  longest row the sampler will draw, or the token budget when packing), ``data.max_seq_len``
  when the data's lengths are not known.
- Evaluation (``trainer.eval_batch_size`` sequences, no gradients, the training loss function)
  is a phase too: under the plain loss its logits can exceed training's on large vocabularies.
- Framework overhead: on CUDA the context and communicator buffers, which the allocator peak
  does not see; on CPU the measured resident size of the runtime itself (interpreter, torch,
  transformers, bitsandbytes, DeepSpeed, gloo, kernels' caches) with a negligible model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpu_fit import cpu_retention, cpu_runtime
from .setup import Setup
from .shapes import CHUNK_ELEMENTS, GiB, MiB, LAYER_LINEARS, ModelShape, lora_params, nf4_bytes

#: DeepSpeed's default reduce_bucket_size (elements); strategies/deepspeed.py does not change it.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
#: CUDA context plus NCCL buffers per rank, outside torch's allocator: ~0.5 GiB of context
#: (CUDA 12/13 on Hopper/Ampere, with cuBLAS workspaces), and per NCCL communicator its
#: channel buffers plus, on NVSwitch systems (H100/H200 SXM), NVLink SHARP's ~288 MiB: 0.5 GiB
#: each. An estimate from published figures, not yet measured on a GPU of ours
#: (benchmarks/gpu_check.sh prints measured against planned); plan.overhead_gb replaces both.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
NCCL_BYTES = int(0.5 * GiB)
#: The caching allocator reserves more than it hands out (blocks split and cached per size,
#: per stream), and an out-of-memory happens at reserved, not allocated, bytes. The plan adds
#: this share of the allocator's peak on CUDA so that it bounds what is reserved: PyTorch's
#: reserved/allocated ratio at the peak of a training step is typically 1.05-1.15 with the
#: default allocator, less with expandable segments, which the ranks turn on
#: (distributed.py).
CUDA_ALLOCATOR_RESERVE = 0.10
RETENTION = "host allocator retention (CPU)"
#: Live host bytes a loaded fast tokenizer keeps per vocabulary entry (vocabulary, merges,
#: added-token tables), beyond the embedded 128-token one the runtime constant already holds:
#: Qwen2.5's 151,646-entry BPE adds 53 MB once its parse garbage is trimmed (278 MB before;
#: the freed heap is reused by later allocations), so ~350 bytes per entry. CPU plans only: a
#: GPU's memory never holds it.
TOKENIZER_BYTES_PER_ENTRY = 350
TOKENIZER = "tokenizer (host)"
#: glibc serves allocations of at least this size with their own mmap (its dynamic threshold
#: stops growing at 32 MiB on 64-bit) and unmaps them when freed: such tensors leave no
#: retention behind. On a large vocabulary the logits are far above it (2 x 256 tokens x 152k
#: entries x 4 bytes = 311 MB), while a layer's activations usually are not.
MMAP_THRESHOLD_BYTES = 32 * MiB


def residual_bytes(s: Setup) -> int:
    """Bytes per element of the residual stream, Linear outputs and MLP tensors: the compute
    dtype's, fp32 when fp32 norms and embeddings promote it (quant.frozen_dtype=fp32)."""
    return 4 if s.frozen_fp32 else s.compute_bytes


def layer_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """Bytes autograd saves per token for one decoder layer in training.

    Counted from the code path: RMSNorm saves its fp32 input; a frozen 4-bit Linear saves no
    activation (bitsandbytes keeps only the weight for the input gradient) and returns its
    input's dtype (fp32 only with quant.frozen_dtype=fp32); each LoRA branch saves its
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
        # lora_A keeps its input: dropout's output, its own; without dropout the layer input
        # itself, one storage for the branches that read it (q/k/v, gate/up), unless autocast
        # had to cast it (an fp32 stream), which makes every branch its own copy.
        shared = not drop and in_bytes == b and name in ("k_proj", "v_proj", "up_proj")
        return mask * d_in + (0 if shared and _reads_same(name, s.targets) else b * d_in) + b * s.lora_r

    norms = 2 * 4 * shape.hidden
    attn = b * (4 * shape.q_dim) + 4 * shape.heads
    mlp = 3 * act * shape.mlp_width
    return norms + attn + mlp + sum(lora(n) for n in LAYER_LINEARS)


def _reads_same(name: str, targets: tuple[str, ...]) -> bool:
    """Whether an earlier adapted projection reads the same input as ``name`` (q for k and v,
    k for v, gate for up)."""
    earlier = {"k_proj": ("q_proj",), "v_proj": ("q_proj", "k_proj"), "up_proj": ("gate_proj",)}
    return any(e in targets for e in earlier[name])


def _head_copy_bytes(shape: ModelShape, s: Setup) -> float:
    """Autocast's compute-dtype copy of the fp32 output head, kept for the input gradient."""
    return shape.vocab * shape.hidden * s.compute_bytes if (s.frozen_fp32 and s.compute_bytes < 4) else 0.0


def _saved_loss_bytes(shape: ModelShape, s: Setup) -> float:
    """What the loss leaves for the backward: the plain loss its fp32 log-softmax (and the head
    copy), the chunked one the hidden states' gradient it already computed."""
    tokens = s.micro_batch * s.train_width
    if s.loss == "chunked":
        return tokens * shape.hidden * residual_bytes(s)
    return tokens * shape.vocab * 4 + _head_copy_bytes(shape, s)


def _loss_rows(shape: ModelShape, s: Setup, tokens: int) -> int:
    """Positions whose logits exist at once: all of them, or one chunk's (loss.py)."""
    return tokens if s.loss != "chunked" else min(tokens, max(1, CHUNK_ELEMENTS // shape.vocab))


def loss_bytes(shape: ModelShape, s: Setup, tokens: int, training: bool) -> float:
    """The loss's bytes on top of the activations, for ``tokens`` positions.

    Plain: the compute-dtype logits, their fp32 copy and, training, log-softmax's output and the
    gradients (fp32 and compute dtype); evaluating, the fp32 copy and its log-softmax.
    Chunked (loss.py): the labelled positions' hidden states gathered into one tensor, and one
    chunk's logits in an fp32 buffer (log-sum-exp and softmax taken in place), beside, in bf16,
    a buffer for their compute-dtype form: 4 bytes per logit in fp32 (measured 4.5 at a 151k
    vocabulary), 6 in bf16 (measured 7.0); its saved gradient is in _saved_loss_bytes.
    """
    b = s.compute_bytes
    if s.loss != "chunked":
        return tokens * shape.vocab * (b + (12 if training else 8)) + (
            _head_copy_bytes(shape, s) if training else 0.0)
    chunk = _loss_rows(shape, s, tokens) * shape.vocab * (4 + (b if b < 4 else 0))
    return chunk + tokens * shape.hidden * residual_bytes(s) + _head_copy_bytes(shape, s)


def saved_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """What autograd holds at the end of one micro-batch's forward (before backward starts)."""
    tokens = s.micro_batch * s.train_width
    resid = residual_bytes(s)
    if s.checkpointing:  # only each layer's input survives the forward
        layers = shape.layers * resid * shape.hidden
    else:
        layers = shape.layers * layer_activation_bytes(shape, s)
    final_norm = 4 * shape.hidden
    mask = s.micro_batch * s.train_width ** 2  # the boolean 4-D attention mask
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
    budget: str = "plan.gpu_memory_gb"  # where limit_bytes came from, for the verdict

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
            return phase.total - phase.items.get(OVERHEAD, 0.0) - phase.items.get(RESERVE, 0.0)
        return phase.total


OVERHEAD = "framework overhead"
EXPERTS = "MoE experts (not quantized, compute dtype)"
RESERVE = "allocator reserve (fragmentation)"


def _communicators(s: Setup) -> int:
    """NCCL communicators a rank creates: one for its group, two under HSDP (a shard group and
    a replica group, each its own communicator)."""
    if s.world <= 1:
        return 0
    return 2 if s.strategy == "fsdp" and 1 < s.shard_ranks < s.world else 1


def _heap_transient(shape: ModelShape, s: Setup, acts: float, logits: float) -> float:
    """The part of a step's transient bytes glibc serves from its heaps (what it can retain):
    each term counts unless its largest tensor is mmap-sized (MMAP_THRESHOLD_BYTES)."""
    tokens = s.micro_batch * s.train_width
    act_tensor = tokens * max(shape.mlp_width, shape.q_dim) * residual_bytes(s)
    logit_tensor = _loss_rows(shape, s, tokens) * shape.vocab * 4
    return ((acts if act_tensor < MMAP_THRESHOLD_BYTES else 0.0)
            + (logits if logit_tensor < MMAP_THRESHOLD_BYTES else 0.0))


def _overhead(s: Setup) -> float:
    if s.overhead_bytes is not None:
        return float(s.overhead_bytes)
    if s.device == "cuda":
        return CUDA_CONTEXT_BYTES + NCCL_BYTES * _communicators(s)
    return cpu_runtime(s.strategy, s.compute_bytes, s.host_allocator)


def plan_memory(shape: ModelShape, s: Setup, limit_bytes: float,
                budget: str = "plan.gpu_memory_gb") -> Plan:
    """Per-rank bytes in the load, train and eval phases of a run."""
    world = s.world
    b = s.compute_bytes
    quantized = s.quant != "none"
    n_q, n_o = shape.quantized_params(), shape.other_params()
    n_lora = lora_params(shape, list(s.targets), s.lora_r)
    base_full = nf4_bytes(n_q, s.double_quant) if quantized else n_q * b
    other_full = n_o * (4 if s.frozen_fp32 else b)
    shard = s.shard_ranks  # world, or HSDP's shard group
    base_div = shard if s.base_sharded else 1
    gpu_resident = not (s.cpu_offload or s.offload_params)  # sharded state lives in host memory

    persistent: dict[str, float] = {}
    label = "4-bit base (NF4 + constants)" if quantized else f"frozen base ({8 * b}-bit)"
    persistent[label] = base_full / base_div if gpu_resident or not s.base_sharded else 0.0
    persistent["non-quantized params (embeddings, norms, head)"] = (
        other_full / base_div if gpu_resident or not s.base_sharded else 0.0)
    experts_full = shape.expert_params() * b  # kept in the compute dtype (model.prepare_loaded)
    if experts_full:
        persistent[EXPERTS] = experts_full / base_div if gpu_resident or not s.base_sharded else 0.0
    lora_div = shard if s.adapter_sharded else 1
    persistent["LoRA params (fp32)"] = 4 * n_lora / lora_div if gpu_resident else 0.0
    grads = 4 * n_lora
    optim = 8 * n_lora
    if s.strategy == "ddp":
        buckets = grads if world > 1 else 0.0
    elif s.strategy == "fsdp":
        grads, optim, buckets = grads / shard, optim / shard, 0.0
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
    persistent["gathered base layers (2 in flight)"] = 2 * layer_base * (1 - 1 / shard) if shard > 1 else 0.0

    tokens = s.micro_batch * s.train_width
    resid = residual_bytes(s)
    # Backward working set: one layer's activation gradients, plus the layer being recomputed
    # under checkpointing.
    working = tokens * layer_activation_bytes(shape, s) * (2 if s.checkpointing else 1)
    acts = saved_activation_bytes(shape, s) - _saved_loss_bytes(shape, s) + working
    logits = loss_bytes(shape, s, tokens, training=True)
    overhead = _overhead(s)
    host_tokenizer = (TOKENIZER_BYTES_PER_ENTRY * max(0, shape.vocab - 128)
                      if s.device == "cpu" and s.overhead_bytes is None else 0.0)

    train = Phase("train", dict(persistent))
    train.items["activations"] = acts
    train.items["logits + loss"] = logits
    if s.device == "cpu" and s.overhead_bytes is None:
        train.items[RETENTION] = cpu_retention(s.kind, b, s.host_allocator) * _heap_transient(shape, s, acts, logits)
    train.items[TOKENIZER] = host_tokenizer
    train.items[OVERHEAD] = overhead

    ev = Phase("eval", dict(persistent))
    ev.items["gradients (fp32)"] = 0.0  # set to None after every optimizer step
    eval_tokens = s.eval_batch * s.eval_width
    ev.items["activations"] = eval_tokens * (resid * shape.hidden * 2 + 3 * resid * shape.mlp_width)
    ev.items["activations"] += eval_tokens * shape.layers * 2 * shape.kv_dim * b  # KV cache (generate)
    ev.items["logits + loss"] = loss_bytes(shape, s, eval_tokens, training=False)
    ev.items[TOKENIZER] = host_tokenizer
    ev.items[OVERHEAD] = overhead

    load = Phase("load")
    largest = max(shape.vocab * shape.hidden, max(a * c for a, c in shape.linears().values()))
    if s.strategy == "fsdp" and s.shard_base and s.low_memory_load and s.device == "cuda":
        # Rank 0 loads into host memory; each accelerator only ever receives its shards.
        load.items[label] = base_full / shard
        load.items["non-quantized params (embeddings, norms, head)"] = other_full / shard
        load.items[EXPERTS] = experts_full / shard
    else:  # every rank (or, loading low-memory on CPU, rank 0) holds the whole model at first
        load.items[label] = base_full
        load.items["non-quantized params (embeddings, norms, head)"] = other_full + largest * b
        load.items[EXPERTS] = experts_full
    load.items[TOKENIZER] = host_tokenizer
    load.items[OVERHEAD] = overhead
    if s.device == "cuda":
        for phase in (load, train, ev):
            phase.items[RESERVE] = CUDA_ALLOCATOR_RESERVE * (phase.total - overhead)
    return Plan(shape, s, [load, train, ev], limit_bytes, n_lora, budget)
