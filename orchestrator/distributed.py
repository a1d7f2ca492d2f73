"""Process group, device and dtype from what the machine has.

One code path for clusters and laptops: NCCL on CUDA devices where there are GPUs, gloo on CPU
where there are none. Nothing here assumes CPU; tests simply run on the gloo branch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist


_PHASE = "startup"
T = TypeVar("T")


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
    timeout_s: int = 600  # the process group's collective timeout (launcher.dist_timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device_type: str, cpu_collectives: bool = False) -> str:
    """The backend string for ``init_process_group``: NCCL on CUDA, gloo on CPU.

    ``cpu_collectives``: some collectives will run on CPU tensors although the ranks compute on
    GPUs (FSDP2 with CPU offload keeps gradients and their norm on the host, and clipping
    all-reduces them there). NCCL has no CPU path ("No backend type associated with device type
    cpu"), so such runs get one group with both, ``cuda:nccl,cpu:gloo``, as torchtune and
    torchtitan use when offloading.
    """
    if device_type == "cuda":
        return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    return "gloo"


def use_expandable_segments() -> None:
    """Let CUDA's caching allocator grow segments in place instead of caching one block per
    size (``expandable_segments``), as torchtitan's runs do: the batches of an unpacked run
    change shape every step, and with fixed segments the reserved memory drifts above what is
    allocated until an out-of-memory at a peak the plan allowed. Must be set before the first
    CUDA allocation; a setting of the user's (either variable) is kept."""
    if not any(k in os.environ for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


#: Primitives oneDNN keeps per matmul shape (its own cache and PyTorch's ideep LRU over it, both
#: 1024 entries by default), each with buffers that grow with the shape: on CPU in bf16 every
#: new batch width adds its own set, so an unpacked run's resident memory grew with every width
#: it met: +1.26 GB over 80 widths on the tiny model, +1.17 GB over 40 on a 17M one, where fp32
#: (no oneDNN) grew by 12 MB (benchmarks/RESULTS.md, "bf16 memory"). 256 entries hold a few
#: widths' sets: on the 300-step demo 7% slower than the default and 75 MB lower; 64 or 128
#: bounded the growth more but recreated a step's own primitives (21% slower).
CPU_KERNEL_CACHE_ENTRIES = 256


def bound_cpu_kernel_caches() -> None:
    """Cap oneDNN's per-shape kernel caches (CPU_KERNEL_CACHE_ENTRIES). Read when the first
    oneDNN primitive is made, so this runs before the model's first op; a setting of the user's
    (either variable) is kept. fp32 matmuls on CPU do not go through oneDNN: no effect there."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(CPU_KERNEL_CACHE_ENTRIES))


def init_distributed(timeout_s: int = 600, cpu_collectives: bool = False) -> DistInfo:
    """Join the process group torchrun (or Slurm via torchrun) set up; world 1 without one.

    Outside a launcher (a test calling ``run`` in-process) no process group is created and every
    collective helper below degrades to the identity. ``DistInfo.backend`` names the device's
    backend (what DeepSpeed is told); the group itself may also carry gloo for CPU tensors
    (``process_group_backend``).
    """
    set_phase("process group start-up (rendezvous)")
    use_expandable_segments()
    bound_cpu_kernel_caches()
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
        kwargs: dict[str, Any] = {"backend": process_group_backend(device.type, cpu_collectives),
                                  "timeout": timedelta(seconds=timeout_s)}
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
    return DistInfo(rank, local_rank, world_size, device, backend, timeout_s)


class Rank0Stalled(RuntimeError):
    """Rank 0 stopped making progress on work the other ranks wait for."""


def while_rank0_works(work: Callable[[], T], what: str, dist_info: DistInfo,
                      beat_s: float = 2.0) -> Optional[T]:
    """Run ``work`` on rank 0 while the others wait outside any collective, as long as it takes.

    Work done by rank 0 alone (loading and quantizing a whole base on the host: minutes for a
    70B model) cannot sit between two collectives: the waiting ranks would hit the collective
    timeout (``launcher.dist_timeout_s``), or NCCL's watchdog, and kill the job while rank 0
    is still busy. Here rank 0 bumps a heartbeat counter in the process group's store from a
    thread while ``work`` runs; the others poll the store and give up only when the counter
    has not moved for ``timeout_s`` (rank 0 died or hung), with one line saying so. Returns
    ``work()``'s result on rank 0, None elsewhere; without a process group it just runs.
    """
    if not dist.is_initialized() or dist_info.world_size == 1:
        return work() if dist_info.rank == 0 else None
    import threading
    import time

    store = dist.distributed_c10d._get_default_store()
    key = f"orchestrator/rank0/{what}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if dist_info.rank == 0:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(beat_s):
                store.add(f"{key}/beat", 1)

        thread = threading.Thread(target=beat, name="rank0-heartbeat", daemon=True)
        thread.start()
        try:
            return work()
        finally:
            done.set()
            thread.join()
            store.set(f"{key}/done", "1")
    last, since = -1, time.monotonic()
    while not store.check([f"{key}/done"]):
        beats = store.add(f"{key}/beat", 0)
        if beats != last:
            last, since = beats, time.monotonic()
        elif time.monotonic() - since > dist_info.timeout_s:
            raise Rank0Stalled(
                f"rank 0 made no progress on {what} for {dist_info.timeout_s} s "
                "(launcher.dist_timeout_s): it died or hung")
        time.sleep(min(0.5, beat_s / 2))
    return None


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
    """From /proc/cpuinfo; ``ORCHESTRATOR_CPU_BF16=0|1`` overrides it, so one machine behaves as
    either kind (the test suite checks both with it: tests/conftest.py)."""
    forced = os.environ.get("ORCHESTRATOR_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def release_free_host_memory(device: torch.device) -> None:
    """Hand the host allocator's freed pages back to the OS, on CPU (hostalloc.py).

    Under glibc, memory freed by training's activations stays in its heaps, fragmented;
    evaluation would then grow the heaps further instead of reusing it (measured +140 MB of
    peak RSS on a 50M-parameter model). Called before each evaluation only: trimming every
    optimizer step kept peak RSS 20% lower but made steps of the tiny model ~14% slower (the
    pages fault back in as they are reused), every micro-batch ~29% slower. The planner models
    what the allocator keeps instead (plan/cpu_fit.py, CPU_RETENTION). On CUDA the caching
    allocator owns device memory and emptying it would only cost speed: nothing to do there.
    """
    if device.type == "cpu":
        from .hostalloc import release_free_memory

        release_free_memory()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
