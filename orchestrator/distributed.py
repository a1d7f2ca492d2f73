"""Process group, device and dtype from what the machine has.

One code path for clusters and laptops: NCCL on CUDA devices where there are GPUs, gloo on CPU
where there are none. Nothing here assumes CPU; tests simply run on the gloo branch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


_PHASE = "startup"


def set_phase(phase: str) -> None:
    """Record what this rank is doing, so a failed or timed-out collective can say where."""
    global _PHASE
    _PHASE = phase


def current_phase() -> str:
    return _PHASE


def describe_failure(exc: BaseException, rank: int, timeout_s: int) -> str:
    """One line for a rank's failure; names the rank, the phase and, for a timed-out
    collective, the timeout and the likely cause."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"rank {rank}: a collective timed out after {timeout_s} s "
                f"(launcher.dist_timeout_s) during {_PHASE}: another rank is hung or dead ({text})")
    return f"rank {rank}: {type(exc).__name__} during {_PHASE}: {text}"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join the process group torchrun (or Slurm via torchrun) set up; world 1 without one.

    Outside a launcher (a test calling ``run`` in-process) no process group is created and every
    collective helper below degrades to the identity.
    """
    set_phase("process group start-up (rendezvous)")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 and "MASTER_ADDR" in os.environ:
            # After torchrun restarts a group, keys a dead rank published (its gloo address)
            # can still be in the shared store; a prefix per attempt keeps the new group from
            # dialling the dead one ("connectFullMesh ... Connection refused").
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False, timeout=timedelta(seconds=timeout_s))
            kwargs.update(store=dist.PrefixStore(f"orchestrator/attempt{restart}", store),
                          rank=rank, world_size=world_size)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, device, backend)


def shutdown() -> None:
    set_phase("shutdown (final barrier: every rank, rank 0 after its W&B upload)")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective (float64 to keep token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length on all ranks), as one tensor collective: cheap
    enough for the per-step metrics, unlike pickling objects through all_gather_object."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [t.tolist()]
    out = torch.empty(dist.get_world_size() * len(values), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(out, t)
    return out.view(dist.get_world_size(), len(values)).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``trainer.precision``.

    auto: bf16 on GPUs that support it (fp16 on older ones); on CPU bf16 where the processor
    has native bf16 instructions (AVX512-BF16/AMX, measured on par with or faster than fp32
    for the tiny model here), fp32 where it would only be emulated.
    """
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision in explicit:
        return explicit[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_LIBC_TRIM = None


def release_free_host_memory(device: torch.device) -> None:
    """Hand the host allocator's freed pages back to the OS (glibc ``malloc_trim``), on CPU.

    glibc keeps memory freed by training's activations in its heaps, fragmented; evaluation
    would then grow the heaps further instead of reusing it (measured +140 MB of peak RSS on a
    50M-parameter model). Called before each evaluation only: trimming every optimizer step
    kept peak RSS 20% lower but made steps of the tiny model ~14% slower (the pages fault back
    in as they are reused), every micro-batch ~29% slower. The planner models the retention
    instead (plan.py, CPU_RETENTION). On CUDA the caching allocator owns device memory and
    emptying it would only cost speed, so this does nothing there; nor without glibc.
    """
    global _LIBC_TRIM
    if device.type != "cpu":
        return
    if _LIBC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # musl, macOS: no malloc_trim
            _LIBC_TRIM = False
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
