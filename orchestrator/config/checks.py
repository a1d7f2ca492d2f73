"""The run configuration's checks that types cannot express: allowed choices, ranges and
cross-field rules, each failing with one line that names the key, the value and what is
allowed; and the accumulation the batch sizes imply on a world size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..hostalloc import SETTINGS
from .data import validate_data
from .errors import ConfigError, is_auto

if TYPE_CHECKING:
    from . import RunConfig

CHOICES: dict[str, tuple[str, ...]] = {
    "quant.method": ("nf4", "fp4", "none"),
    "quant.storage_dtype": ("auto", "uint8", "bf16", "fp16", "fp32"),
    "quant.frozen_dtype": ("compute", "fp32"),
    "lora.bias": ("none", "all", "lora_only"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "bf16", "fp16", "fp32"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.loss": ("chunked", "plain"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "sweep.kind": ("grid", "optuna"),
    "sweep.direction": ("minimize", "maximize"),
    "plan.device": ("cuda", "cpu"),
    "launcher.cpu_allocator": SETTINGS,
}



def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    """Checks that types alone cannot express. Raises ConfigError with a one-line message."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")

    def positive(key: str, allow_zero: bool = False) -> None:
        value = _get(cfg, key)
        if value < 0 or (value == 0 and not allow_zero):
            need = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{key}={value!r} is not allowed; it must be {need}")

    _check_auto(cfg)
    for key in ("lora.r", "lora.alpha", "trainer.global_batch_size",
                "trainer.eval_batch_size", "optim.lr",
                "trainer.eval_max_new_tokens", "logger.every_n_steps", "sweep.n_trials",
                "plan.gpu_memory_gb", "plan.intra_node_gb_per_s", "plan.inter_node_gbit_per_s",
                "plan.gpu_tflops"):
        positive(key)
    for key in ("trainer.eval_every", "trainer.save_every", "trainer.eval_generate_examples",
                "optim.warmup_steps", "optim.weight_decay", "trainer.max_grad_norm",
                "trainer.keep_last_n", "trainer.save_every_minutes"):
        positive(key, allow_zero=True)
    for key in ("logger.wandb.probe_timeout_s", "logger.wandb.init_timeout_s",
                "logger.wandb.finish_timeout_s"):
        positive(key)
    if cfg.plan.overhead_gb is not None:
        positive("plan.overhead_gb", allow_zero=True)
    if cfg.plan.host_memory_gb is not None:
        positive("plan.host_memory_gb")
    validate_data(cfg.data)
    if cfg.run.fork_from and cfg.lora.init_from:
        raise ConfigError(f"run.fork_from={cfg.run.fork_from} and lora.init_from={cfg.lora.init_from} "
                          "are two starting points; set one")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout={cfg.lora.dropout!r} is not allowed; it must be in [0, 1)")
    if cfg.lora.target_parameters and cfg.lora.dropout != 0.0:
        raise ConfigError(
            f"lora.target_parameters={list(cfg.lora.target_parameters)} needs lora.dropout=0 "
            f"(PEFT applies no dropout to parameter targets), not {cfg.lora.dropout}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"optim.min_lr_ratio={cfg.optim.min_lr_ratio!r} is not allowed; it must be in [0, 1]"
        )
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas!r} is not allowed; give two values in [0, 1)")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.epochs <= 0:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps} and trainer.epochs={cfg.trainer.epochs}: "
            "set max_steps > 0 or epochs > 0"
        )
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules=[] is not allowed; name modules or use [all-linear]")
    if cfg.quant.method == "none" and cfg.quant.storage_dtype not in ("auto",):
        raise ConfigError(
            f"quant.storage_dtype={cfg.quant.storage_dtype!r} applies only to 4-bit quantization; "
            "leave it auto with quant=none"
        )
    if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage not in (2, 3):
        raise ConfigError(
            f"strategy.zero_stage={cfg.strategy.zero_stage} is not allowed; choose one of: 2, 3"
        )
    if cfg.strategy.name == "deepspeed" and cfg.strategy.offload_params and cfg.strategy.zero_stage != 3:
        raise ConfigError("strategy.offload_params=true needs strategy.zero_stage=3")
    if cfg.strategy.name == "deepspeed" and cfg.trainer.on_nonfinite == "skip":
        raise ConfigError(
            "trainer.on_nonfinite='skip' is not supported with strategy=deepspeed (its engine "
            "applies the step itself); use stop"
        )
    if cfg.strategy.name == "fsdp" and cfg.strategy.replicate < 0:
        raise ConfigError(f"strategy.replicate={cfg.strategy.replicate} is not allowed; it must be "
                          ">= 0 (0: one replica per node, 1: shard over all ranks)")
    if getattr(cfg.strategy, "shard_base", False) and cfg.quant.storage_dtype == "uint8":
        raise ConfigError(
            "quant.storage_dtype='uint8' cannot be sharded with strategy.shard_base=true; "
            "leave it auto (the compute dtype) or choose bf16, fp16 or fp32"
        )
    if (getattr(cfg.strategy, "shard_base", False) and getattr(cfg.strategy, "mixed_precision", False)
            and cfg.quant.method != "none" and cfg.quant.storage_dtype not in ("auto", cfg.trainer.precision)):
        # FSDP's param_dtype casts every sharded float parameter after the all-gather, the
        # packed 4-bit bytes included: a numeric cast of bytes corrupts the base (fsdp_qlora:
        # the storage dtype must match FSDP's param_dtype).
        raise ConfigError(
            f"quant.storage_dtype={cfg.quant.storage_dtype!r} with strategy.mixed_precision=true "
            f"and trainer.precision={cfg.trainer.precision!r}: FSDP would cast the packed 4-bit "
            "bytes to the compute dtype and corrupt them; leave quant.storage_dtype auto (the "
            "compute dtype) or set it and trainer.precision to the same dtype"
        )
    if not is_auto(cfg.trainer.micro_batch_size) and cfg.trainer.global_batch_size % cfg.trainer.micro_batch_size:
        raise ConfigError(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={cfg.trainer.micro_batch_size}"
        )


def _check_auto(cfg: RunConfig) -> None:
    """The two settings that take an int/bool or ``auto``: anything else is refused here."""
    micro = cfg.trainer.micro_batch_size
    if not is_auto(micro) and (isinstance(micro, bool) or not isinstance(micro, int) or micro <= 0):
        raise ConfigError(f"trainer.micro_batch_size={micro!r} is not allowed; it must be an "
                          "integer > 0 or auto")
    ckpt = cfg.model.gradient_checkpointing
    if not is_auto(ckpt) and not isinstance(ckpt, bool):
        raise ConfigError(f"model.gradient_checkpointing={ckpt!r} is not allowed; choose one of: "
                          "true, false, auto")


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, so the global batch is the same on any world."""
    per_step = cfg.trainer.micro_batch_size * world_size
    if cfg.trainer.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={cfg.trainer.micro_batch_size} x world size {world_size}; "
            f"use a multiple of {per_step}"
        )
    return cfg.trainer.global_batch_size // per_step
