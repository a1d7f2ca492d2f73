"""The planner's CPU constants, measured rather than derived: the resident size of the runtime
itself and what the host allocator keeps beyond the live bytes, per strategy, precision and
host allocator (orchestrator/hostalloc.py). memory.py adds them to CPU plans; GPU plans use
none of them. ``benchmarks/planner_accuracy.py --calibrate`` refits them."""

from __future__ import annotations

from .shapes import MiB

#: Peak RSS per rank of `orchestrate train` with a negligible model (hidden 64, 1 layer, fp32,
#: 100 steps with evaluation) under glibc's malloc (launcher.cpu_allocator=glibc, or where the
#: mimalloc wheel is missing), by strategy, less that model's own planned bytes (~7 MB):
#: measured by ``benchmarks/planner_accuracy.py --calibrate --steps 100`` on the 2-core build
#: machine (torch 2.13 CPU, AVX512-BF16, 2 gloo ranks, the datasets/pyarrow data pipeline
#: loaded), 2026-12-06. Override with plan.overhead_gb elsewhere.
CPU_RUNTIME_BYTES = {
    "ddp": int(526 * MiB),
    "fsdp": int(526 * MiB),
    "deepspeed": int(557 * MiB),
}
#: The same in bf16 (and fp16), where oneDNN runs the matmuls and keeps compiled kernels per
#: shape (up to distributed.CPU_KERNEL_CACHE_ENTRIES), a part that does not grow with the model
#: (``--calibrate --precision bf16``; the fp32 runs of that negligible model peak ~180 MB lower).
CPU_RUNTIME_BYTES_HALF = {
    "ddp": int(705 * MiB),
    "fsdp": int(713 * MiB),
    "deepspeed": int(735 * MiB),
}

#: What the host keeps beyond the live bytes on CPU over a whole run, as a fraction of a training
#: step's transient bytes (activations and logits; the heap-sized ones, see
#: memory.MMAP_THRESHOLD_BYTES), by strategy kind. glibc keeps freed activation memory in its heaps,
#: fragmented, and later steps grow the heaps instead of reusing it; FSDP's all-gathers and
#: ZeRO-3's parameter gathers add their own churn. Fitted over 100-step runs of one held-out
#: model (~17M parameters, ``planner_accuracy.py --calibrate``) and checked on the 3M and 50M
#: models (benchmarks/RESULTS.md). Not applied on CUDA, where the measured peak is the caching
#: allocator's live bytes.
CPU_RETENTION = {
    "ddp": 1.45,
    "fsdp": 1.88,
    "fsdp shard_base": 1.99,
    "zero2": 1.11,
    "zero3": 2.26,
}
#: The same in bf16 (and fp16): oneDNN runs those matmuls and keeps kernels with buffers per
#: shape, up to distributed.CPU_KERNEL_CACHE_ENTRIES of them, on top of glibc's retention.
CPU_RETENTION_HALF = {
    "ddp": 2.29,
    "fsdp": 2.83,
    "fsdp shard_base": 2.43,
    "zero2": 2.77,
    "zero3": 3.32,
}


#: The same four tables under mimalloc, which CPU ranks run under by default
#: (launcher.cpu_allocator=auto, orchestrator/hostalloc.py, with its PURGE_DELAY_MS), fitted
#: the same way (``planner_accuracy.py --calibrate`` with the wheel installed, same machine,
#: 2026-12-06). mimalloc reuses freed blocks and hands emptied pages back, so in fp32 it keeps
#: little beyond the live bytes (its runtime sits ~55 MB higher: per-thread heaps); in bf16
#: what remains is mostly oneDNN's per-shape kernel buffers.
MIMALLOC_RUNTIME_BYTES = {
    "ddp": int(583 * MiB),
    "fsdp": int(587 * MiB),
    "deepspeed": int(612 * MiB),
}
MIMALLOC_RUNTIME_BYTES_HALF = {
    "ddp": int(730 * MiB),
    "fsdp": int(734 * MiB),
    "deepspeed": int(768 * MiB),
}
MIMALLOC_RETENTION = {
    "ddp": 0.03,
    "fsdp": 0.25,
    "fsdp shard_base": 0.22,
    "zero2": 0.07,
    "zero3": 0.53,
}
MIMALLOC_RETENTION_HALF = {
    "ddp": 1.00,
    "fsdp": 1.16,
    "fsdp shard_base": 0.87,
    "zero2": 1.10,
    "zero3": 1.26,
}

#: (host allocator, fp32?) -> (runtime bytes by strategy, retention by strategy kind).
_CPU_TABLES = {
    ("glibc", True): (CPU_RUNTIME_BYTES, CPU_RETENTION),
    ("glibc", False): (CPU_RUNTIME_BYTES_HALF, CPU_RETENTION_HALF),
    ("mimalloc", True): (MIMALLOC_RUNTIME_BYTES, MIMALLOC_RETENTION),
    ("mimalloc", False): (MIMALLOC_RUNTIME_BYTES_HALF, MIMALLOC_RETENTION_HALF),
}


def cpu_runtime(strategy: str, compute_bytes: int, allocator: str) -> float:
    """The CPU runtime's own resident bytes under a strategy, a compute dtype's width and a
    host allocator (hostalloc.py)."""
    return float(_CPU_TABLES[allocator, compute_bytes == 4][0][strategy])


def cpu_retention(kind: str, compute_bytes: int, allocator: str) -> float:
    """The retention factor of a strategy kind (Setup.kind) at a compute dtype's width under a
    host allocator."""
    return _CPU_TABLES[allocator, compute_bytes == 4][1][kind]
