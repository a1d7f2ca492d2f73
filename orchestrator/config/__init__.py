"""The run configuration: schema, defaults and validation.

YAML files under ``conf/`` hold values; this module holds the types. Hydra composes the YAML with
the user's overrides against these dataclasses (registered in its ConfigStore), so a mistyped key
or a wrong type fails at composition. :func:`validate` then checks what types cannot express
(allowed choices, ranges, cross-field rules) and names the key, the value and what is allowed.

The launcher resolves the composed config once and writes it to ``run_dir/config.yaml``; every
rank rebuilds the same :class:`RunConfig` from that file with :func:`from_container`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from .checks import CHOICES, accumulation_steps, validate
from .data import DataConfig
from .errors import AUTO, ConfigError, is_auto

_PACKAGE = Path(__file__).resolve().parent.parent  # orchestrator/
ASSETS_DIR = _PACKAGE / "assets"
# A wheel carries the repository's conf/ as orchestrator/_conf (setup.py); a clone and an
# editable install read conf/ at the top of the repository.
_PACKAGED_CONF = _PACKAGE / "_conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _PACKAGE.parent / "conf"


def _asset(name: str) -> str:
    """``${asset:tiny-llama}`` -> absolute path of a file shipped inside the package."""
    path = ASSETS_DIR / name
    return str(path)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", _asset)


@dataclass
class ModelConfig:
    # Local directory (or hub id, where a hub is reachable) of a transformers causal LM.
    path: str = MISSING
    # Tokenizer location; defaults to the model path.
    tokenizer: Optional[str] = None
    # null: the family's default, as transformers chooses it (sdpa where the family supports
    # it; Gemma 2 needs eager); or any value transformers accepts (eager, sdpa,
    # flash_attention_2, flash_attention_3, flex_attention, a kernels hub id), checked before
    # launch against the model's family.
    attn_implementation: Optional[str] = None
    # true | false | auto (the fastest that fits the memory budget, resolved by the launcher;
    # orchestrator/plan/auto.py). Typed Any: structured configs have no Union[bool, str].
    gradient_checkpointing: Any = False
    trust_remote_code: bool = False


@dataclass
class QuantConfig:
    # nf4 | fp4 | none (none = plain LoRA on a 16/32-bit frozen base)
    method: str = "nf4"
    double_quant: bool = True
    # Dtype the packed 4-bit weights are stored in. auto lets the strategy choose (FSDP needs a
    # float storage dtype to shard the base; DDP keeps uint8).
    storage_dtype: str = "auto"
    # Train anyway when 4-bit quantization would leave more than 5% of the base's matmul
    # weights in 16/32 bits (fused MoE experts, layer types bitsandbytes does not replace);
    # by default such a run is refused before launch (orchestrator/families.py).
    allow_unquantized: bool = False
    # The frozen weights 4-bit quantization leaves in 16/32 bits (embeddings, norms, output head).
    # compute: kept in the compute dtype, and with them the residual stream and every layer's
    # activations (TRL's SFTTrainer, torchtune, plain bf16 training). fp32: upcast as PEFT's
    # prepare_model_for_kbit_training does, an fp32 residual stream: in bf16 about 1.5x the
    # activation memory (benchmarks/RESULTS.md, issue #28), the older HF QLoRA recipe.
    frozen_dtype: str = "compute"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names, or ["all-linear"] for every linear layer but the output head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Parameters (not modules) that get LoRA as well, e.g. MoE experts fused into 3-D tensors:
    # ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] (PEFT's target_parameters; it
    # needs lora.dropout=0).
    target_parameters: list[str] = field(default_factory=list)
    # A PEFT LoRA adapter directory (a run's adapter/, or any LoRA adapter for the same base)
    # whose weights start the training; its r, alpha, rsLoRA and target modules are the run's
    # (a different value set here is refused before launch).
    init_from: Optional[str] = None
    bias: str = "none"
    use_rslora: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # cosine | linear | constant, each after a linear warmup
    scheduler: str = "cosine"
    warmup_steps: int = 10
    # The schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    # Stop after this many optimizer steps; <= 0 means train for `epochs` epochs.
    max_steps: int = -1
    epochs: int = 1
    # Sequences per optimizer step over all ranks. Accumulation is derived from it:
    # global_batch_size = micro_batch_size x accumulation x world size.
    global_batch_size: int = 16
    # An int, or auto: the largest that fits the memory budget (resolved once by the launcher
    # and frozen into config.yaml; orchestrator/plan/auto.py). Typed Any: no Union[int, str].
    micro_batch_size: Any = 4
    eval_batch_size: int = 16
    max_grad_norm: float = 1.0
    # auto: bf16 where the hardware has it (GPU, or CPU with AVX512-BF16/AMX), else fp16 on
    # older GPUs and fp32 on other CPUs.
    precision: str = "auto"
    seed: int = 1234
    # Evaluate every N optimizer steps (0: only before and after training).
    eval_every: int = 0
    # Exact-match accuracy: greedy-decode at most this many eval prompts (0: skip).
    eval_generate_examples: int = 200
    eval_max_new_tokens: int = 16
    # Save a resumable checkpoint every N optimizer steps (0: only at the end).
    save_every: int = 0
    # Also save when this many minutes have passed since the last save (0: off), so a crash,
    # OOM kill or lost node costs at most this much work. Rank 0's clock decides for all.
    save_every_minutes: float = 30.0
    # Keep this many complete checkpoints (0: keep all).
    keep_last_n: int = 2
    # On a non-finite loss or gradient norm: stop (the last good checkpoint stays) or skip
    # the update and go on.
    on_nonfinite: str = "stop"
    # chunked: cross-entropy computed inside the output head over labelled positions only, a
    # chunk at a time, never the full-vocabulary logits (orchestrator/loss.py); falls back to
    # plain (full logits), with a warning, for heads it cannot replace.
    loss: str = "chunked"


@dataclass
class StrategyConfig:
    name: str = "ddp"


@dataclass
class DDPConfig(StrategyConfig):
    name: str = "ddp"
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False


@dataclass
class FSDPConfig(StrategyConfig):
    name: str = "fsdp"
    # Shard the 4-bit base too (stored in the compute dtype), for bases larger than one device.
    shard_base: bool = False
    # With shard_base: rank 0 alone loads and quantizes the base and sends each rank its shard
    # (host RAM ~ one model, not world x model). false: every rank loads the whole base first.
    low_memory_load: bool = True
    reshard_after_forward: bool = True
    # Keep sharded parameters, gradients and optimizer state in host memory.
    cpu_offload: bool = False
    # Gather parameters in the compute dtype and reduce gradients in fp32.
    mixed_precision: bool = False
    # HSDP: shard within groups of world/replicate ranks and replicate across the groups, so
    # base all-gathers stay inside a node and only adapter gradients cross nodes. 0 (auto): one
    # group per node, derived by each rank from the job's shape (WORLD_SIZE / LOCAL_WORLD_SIZE),
    # so a resume on another node count re-derives it; 1: shard over all ranks (plain FSDP).
    replicate: int = 0


@dataclass
class DeepSpeedConfig(StrategyConfig):
    name: str = "deepspeed"
    # 2: adapter gradients and optimizer state sharded; 3: parameters (the 4-bit base too).
    zero_stage: int = 2
    offload_optimizer: bool = False
    # ZeRO-3 only: keep parameter shards in host memory.
    offload_params: bool = False


@dataclass
class LauncherConfig:
    name: str = "local"
    # Host malloc of CPU ranks: auto (mimalloc where the cmeel-mimalloc wheel is installed, on
    # CPU ranks only), mimalloc, or glibc (the system's). glibc's heaps keep freed activations
    # and make a run's peak vary from launch to launch; see orchestrator/hostalloc.py.
    cpu_allocator: str = "auto"


@dataclass
class LocalLauncherConfig(LauncherConfig):
    name: str = "local"
    # Ranks on this node; null: one per GPU, or 2 on a machine without GPUs.
    nproc_per_node: Optional[int] = None
    # torchrun restarts of the whole group after a rank fails.
    max_restarts: int = 0
    # Timeout of collectives, in seconds; a hung rank fails the run after this long.
    dist_timeout_s: int = 600


@dataclass
class SlurmLauncherConfig(LauncherConfig):
    name: str = "slurm"
    nodes: int = 1
    # GPUs per node to request (--gpus-per-node); null or 0 on CPU-only partitions.
    gpus_per_node: Optional[int] = None
    # Ranks per node; null: gpus_per_node, or 1 without GPUs.
    nproc_per_node: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "01:00:00"
    constraint: Optional[str] = None
    exclusive: bool = False
    mem: Optional[str] = None
    cpus_per_task: Optional[int] = None
    job_name: Optional[str] = None
    # Extra '#SBATCH' lines, e.g. ["--mail-type=END", "--reservation=x"].
    extra_sbatch: list[str] = field(default_factory=list)
    # Shell lines run before training on every node (module loads, venv activation).
    setup: list[str] = field(default_factory=list)
    # Extra environment for the ranks as KEY=VALUE (NCCL settings and the like).
    env: list[str] = field(default_factory=list)
    # Seconds of warning before a time limit or preemption: checkpoint, exit, requeue.
    signal_grace_s: int = 120
    requeue: bool = True
    rdzv_port: int = 29500
    max_restarts: int = 0
    dist_timeout_s: int = 1800
    # Sweeps (orchestrate train -m): array tasks (trials) running at once (the %N of
    # --array); 0: no limit.
    array_parallelism: int = 4
    # Write and print the sbatch script, submit nothing.
    dry_run: bool = False
    # A template in slurm/ or a path to your own.
    template: str = "train.sbatch"


@dataclass
class WandbConfig:
    enabled: bool = False
    # auto: online when an API key is configured (WANDB_API_KEY or netrc), offline otherwise.
    mode: str = "auto"
    project: str = "qlora-orchestrator"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    # Start-up and finish never stop training (orchestrator/wandb_sink.py): seconds to wait for
    # the server to answer at all, for an online wandb.init (then: an offline run with the
    # same id, to `wandb sync` later), and for the upload at the end (the rest stays on disk).
    probe_timeout_s: float = 5.0
    init_timeout_s: float = 20.0
    finish_timeout_s: float = 60.0


@dataclass
class LoggerConfig:
    every_n_steps: int = 1
    console: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunDirConfig:
    # Run directory; null: <root>/<name>-<timestamp>.
    dir: Optional[str] = None
    root: str = "runs"
    name: Optional[str] = None
    # Continue from the latest checkpoint when run.dir already holds one.
    resume: bool = True
    # Start this (new) run from another run's checkpoint: a checkpoint directory
    # (RUN/checkpoints/step-N) or a run directory (its latest). The parent is only read. Its
    # LoRA shape is this run's; everything else may change.
    fork_from: Optional[str] = None
    # true: the optimizer moments, the step and the data position continue from the checkpoint
    # (this run's data and global batch must then be the parent's); false: only the adapter
    # weights, from step 0 with a fresh optimizer and schedule.
    fork_optimizer: bool = True


@dataclass
class SweepConfig:
    """Read by ``orchestrate train -m`` only; a single run ignores it."""

    # grid: every combination of the comma-separated override values (Hydra's basic sweeper);
    # optuna: n_trials trials sampled from `params` and the command line's sweep overrides.
    kind: str = "grid"
    # Sweep directory (one run directory per trial under it); null: <run.root>/sweeps/<name>-<time>.
    dir: Optional[str] = None
    # Sweep name: the W&B group of every trial; null: <model>-<kind>.
    name: Optional[str] = None
    # summary.json key that ranks the trials (and that Optuna optimizes).
    metric: str = "eval_loss_after"
    direction: str = "minimize"
    # Optuna, in hydra-optuna-sweeper's format: trials, sampler (instantiated from _target_),
    # study name and storage (null: in memory; e.g. sqlite:///study.db to keep the study).
    n_trials: int = 10
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 123})
    study_name: Optional[str] = None
    storage: Optional[str] = None
    # Search space, KEY: interval(a,b) | tag(log,interval(a,b)) | range(a,b[,step]) |
    # choice(a,b,...) | a,b,...; sweep overrides on the command line add to it.
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class PlanConfig:
    # Memory of one GPU in GiB, as nvidia-smi reports it / 1024 (24 for an RTX 4090, 80 for an
    # H100 80GB); `orchestrate plan` checks the per-rank peak against it.
    gpu_memory_gb: float = 80.0
    # Plan for GPUs (cuda) or for a CPU run (cpu: process RSS, what CPU runs measure).
    device: str = "cuda"
    # Framework overhead per rank in GiB; null: the CUDA context and NCCL buffers on cuda, the
    # runtime's measured resident size plus the host allocator's retention on cpu
    # (orchestrator/plan.py). A value given here replaces both.
    overhead_gb: Optional[float] = None
    # Links for the communication plan: GPU-to-GPU inside a node in GB/s per GPU (900: NVLink 4
    # on H100/H200 SXM; ~64 for PCIe 5 x16) and between nodes in Gb/s per GPU (400: one NDR
    # InfiniBand or 400G RoCE NIC per GPU; 200 HDR; 100 on many Ethernet clusters).
    intra_node_gb_per_s: float = 900.0
    inter_node_gbit_per_s: float = 400.0
    # Peak dense bf16 TFLOP/s of one GPU, for the compute lower bound (989: H100/H200 SXM).
    gpu_tflops: float = 989.0
    # `orchestrate train` refuses a run whose plan exceeds the memory its ranks will have (the
    # visible GPUs' free memory, plan.gpu_memory_gb on Slurm, the host's available memory on
    # CPU) or whose run directory lacks room for two checkpoints and the adapter; false: warn
    # and launch anyway.
    enforce: bool = True
    # Host memory in GiB for the ranks of one node on CPU; null: what the host has available
    # (MemAvailable, or the cgroup's limit), or launcher.mem on Slurm.
    host_memory_gb: Optional[float] = None


@dataclass
class RunConfig:
    run: RunDirConfig = field(default_factory=RunDirConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Typed per option (see STRATEGY_SCHEMAS): a key that one strategy lacks is refused.
    strategy: Any = field(default_factory=lambda: {"name": "ddp"})
    launcher: Any = field(default_factory=lambda: {"name": "local"})
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


STRATEGY_SCHEMAS: dict[str, type] = {
    "ddp": DDPConfig, "fsdp": FSDPConfig, "deepspeed": DeepSpeedConfig,
}
LAUNCHER_SCHEMAS: dict[str, type] = {"local": LocalLauncherConfig, "slurm": SlurmLauncherConfig}

def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore so conf/*.yaml are checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, schema in STRATEGY_SCHEMAS.items():
        cs.store(group="strategy", name=f"{name}_schema", node=schema)
    for name, schema in LAUNCHER_SCHEMAS.items():
        cs.store(group="launcher", name=f"{name}_schema", node=schema)


def _polymorphic(container: dict, key: str, schemas: dict[str, type]) -> Any:
    node = dict(container.get(key) or {})
    name = node.get("name", "")
    if name not in schemas:
        raise ConfigError(f"{key}.name={name!r} is not allowed; choose one of: {', '.join(schemas)}")
    merged = OmegaConf.merge(OmegaConf.structured(schemas[name]), node)
    return OmegaConf.to_object(merged)


def from_container(container: dict) -> RunConfig:
    """Build a typed, validated RunConfig from a plain (resolved) dict.

    Used on the composed config in the launcher and on ``config.yaml`` in every rank, so both
    see exactly the same object.
    """
    container = dict(container)
    strategy = _polymorphic(container, "strategy", STRATEGY_SCHEMAS)
    launcher = _polymorphic(container, "launcher", LAUNCHER_SCHEMAS)
    container.pop("strategy", None)
    container.pop("launcher", None)
    base = OmegaConf.merge(OmegaConf.structured(RunConfig), container)
    cfg: RunConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    cfg.strategy = strategy
    cfg.launcher = launcher
    validate(cfg)
    return cfg


def to_container(cfg: RunConfig) -> dict:
    """Plain dict of a RunConfig (for config.yaml, W&B and the summary)."""
    return dataclasses.asdict(cfg)
