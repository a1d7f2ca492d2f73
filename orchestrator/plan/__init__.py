"""Memory planner: bytes per rank for a run, before anything launches, by concern:

    shapes   the model's shape from config.json; parameter, LoRA and 4-bit byte counts
    setup    what the planner needs from a RunConfig, flattened
    memory   the memory model: load, train and eval phases per rank
    cpu_fit  its measured CPU constants (runtime, host allocator retention), per allocator
    lengths  the prepared data's real lengths: the widest micro-batch the run will form
    suggest  changes that would make a run fit
    auto     trainer.micro_batch_size=auto / model.gradient_checkpointing=auto: the fastest
             setting that fits the memory budget
    report   the plan of a RunConfig, and `orchestrate plan`'s text
    comm     bytes each rank sends per step (intra/inter node) and the time they take at least

The names below are the package's public interface (train.py, launch/, benchmarks, tests).
"""

from .comm import CommPlan, JobShape, comm_plan, comm_plan_for_run, compute_seconds, format_comm
from .auto import AutoChoice, candidates, choose, host_available, memory_budget
from .lengths import DataLengths, data_lengths, example_lengths, longest_drawn
from .cpu_fit import CPU_RETENTION, CPU_RUNTIME_BYTES, cpu_retention
from .memory import (
    CUDA_CONTEXT_BYTES, DEEPSPEED_BUCKET_ELEMENTS, NCCL_BYTES,
    CUDA_ALLOCATOR_RESERVE, OVERHEAD, RESERVE, RETENTION, TOKENIZER, TOKENIZER_BYTES_PER_ENTRY, Phase, Plan, layer_activation_bytes,
    plan_memory, residual_bytes, saved_activation_bytes,
)
from .report import format_plan, plan_for_run, report, resolve_auto
from .setup import Setup, compute_bytes_for, setup_from_config
from .shapes import (
    LAYER_LINEARS, GiB, MiB, ModelShape, PlanError, lora_params, lora_targets, nf4_bytes, read_shape,
)
from .suggest import Suggestion, phase_total, suggest

__all__ = [
    "AutoChoice", "CommPlan", "JobShape", "comm_plan", "comm_plan_for_run", "compute_seconds",
    "format_comm", "CPU_RETENTION", "cpu_retention", "CPU_RUNTIME_BYTES", "CUDA_CONTEXT_BYTES", "DEEPSPEED_BUCKET_ELEMENTS",
    "DataLengths", "GiB", "LAYER_LINEARS", "MiB", "ModelShape", "NCCL_BYTES", "OVERHEAD", "RESERVE", "CUDA_ALLOCATOR_RESERVE", "Phase",
    "Plan", "PlanError", "RETENTION", "Setup", "Suggestion", "TOKENIZER", "TOKENIZER_BYTES_PER_ENTRY",
    "candidates", "choose",
    "compute_bytes_for", "data_lengths", "example_lengths", "format_plan", "host_available",
    "layer_activation_bytes", "longest_drawn", "lora_params", "lora_targets", "memory_budget",
    "nf4_bytes", "phase_total", "plan_for_run", "plan_memory", "read_shape", "report",
    "residual_bytes", "resolve_auto", "saved_activation_bytes", "setup_from_config", "suggest",
]
