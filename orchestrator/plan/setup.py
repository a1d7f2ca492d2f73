"""What the planner needs from a RunConfig, flattened into one frozen value, so suggestions and
``auto`` settings can vary it one field at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .shapes import GiB, ModelShape, lora_targets

if TYPE_CHECKING:
    from .lengths import DataLengths


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
    seq_len: int  # data.max_seq_len
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
    # The longest row (tokens) of any training / eval micro-batch the run will form, from the
    # data's real lengths (lengths.py); None: data.max_seq_len, the worst case.
    train_len: Optional[int] = None
    eval_len: Optional[int] = None
    # fsdp: HSDP replica groups (strategy.replicate resolved for the job's shape); FSDP shards
    # over world / replicas ranks.
    replicas: int = 1
    # quant.frozen_dtype=fp32: embeddings, norms and head upcast around a 4-bit base, and with
    # them the residual stream.
    frozen_fp32: bool = False
    # trainer.loss as it will run: chunked (one chunk of logits at a time) or plain (all of
    # them); chunked falls back to plain for heads that transform their logits.
    loss: str = "chunked"
    # The host malloc CPU ranks run under (hostalloc.py): its retention is the CPU constants'.
    host_allocator: str = "glibc"

    @property
    def shard_ranks(self) -> int:
        """Ranks one copy of a sharded tensor is split over (FSDP's shard group, else world)."""
        return max(1, self.world // max(self.replicas, 1)) if self.strategy == "fsdp" else self.world

    @property
    def train_width(self) -> int:
        return self.seq_len if self.train_len is None else self.train_len

    @property
    def eval_width(self) -> int:
        return self.seq_len if self.eval_len is None else self.eval_len

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
            s += f" replicate={self.replicas}" if self.replicas > 1 else ""
        elif s == "deepspeed":
            s += f" zero_stage={self.zero_stage}" + (" offload_optimizer" if self.offload_optimizer else "")
            s += " offload_params" if self.offload_params else ""
        return s


def setup_from_config(cfg, world: int, device: str, compute_bytes: int, shape: ModelShape,
                      data: Optional["DataLengths"] = None, ranks_per_node: Optional[int] = None) -> Setup:
    """Flatten a RunConfig for the planner; ``data``: the prepared data's lengths, when known;
    ``ranks_per_node`` decides HSDP's groups when strategy.replicate is auto (one per node)."""
    from ..config import FSDPConfig  # what a suggestion to switch to FSDP would get
    from ..hostalloc import planned

    st = cfg.strategy
    overhead = cfg.plan.overhead_gb
    return Setup(
        strategy=st.name, world=world, device=device, compute_bytes=compute_bytes,
        quant=cfg.quant.method, double_quant=cfg.quant.double_quant, lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout, targets=tuple(lora_targets(shape, cfg.lora.target_modules)),
        micro_batch=cfg.trainer.micro_batch_size, seq_len=cfg.data.max_seq_len,
        eval_batch=cfg.trainer.eval_batch_size if has_eval(cfg, data) else 0,
        checkpointing=cfg.model.gradient_checkpointing,
        shard_base=getattr(st, "shard_base", False), zero_stage=getattr(st, "zero_stage", 2),
        cpu_offload=getattr(st, "cpu_offload", False),
        offload_optimizer=getattr(st, "offload_optimizer", False),
        offload_params=getattr(st, "offload_params", False),
        low_memory_load=getattr(st, "low_memory_load", getattr(FSDPConfig(), "low_memory_load", None)),
        overhead_bytes=None if overhead is None else int(overhead * GiB),
        train_len=data.train if data else None, eval_len=data.eval if data else None,
        replicas=(getattr(st, "replicate", 1) or max(1, world // (ranks_per_node or world)))
        if st.name == "fsdp" else 1,
        frozen_fp32=cfg.quant.method != "none" and cfg.quant.frozen_dtype == "fp32",
        loss=cfg.trainer.loss if shape.plain_head else "plain",
        host_allocator=planned(cfg.launcher.cpu_allocator) if device == "cpu" else "glibc",
    )


def has_eval(cfg, data: Optional["DataLengths"]) -> bool:
    """Whether the run evaluates (before training, after it): the eval batch's memory and
    ZeRO-3's gathers depend on it. The prepared data says so when known, else the config."""
    if data is not None:
        return data.eval > 0
    return bool(cfg.data.eval_path) or cfg.data.eval_fraction > 0


def compute_bytes_for(precision: str, device: str) -> int:
    """Bytes of the compute dtype ``trainer.precision`` resolves to on ``device``."""
    if precision in ("bf16", "fp16"):
        return 2
    if precision == "fp32":
        return 4
    if device == "cuda":
        return 2  # bf16 or fp16, whichever the GPU has
    import torch

    from ..distributed import resolve_precision

    return resolve_precision(precision, torch.device("cpu")).itemsize
