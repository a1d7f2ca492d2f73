"""The host memory allocator CPU ranks run under: mimalloc, preloaded, or the system's malloc.

Why not glibc's malloc: it keeps memory freed by one step's activations in fragmented heaps
and grows them instead of reusing it, differently from launch to launch: the same 1-rank run
of a real-size model peaked anywhere from 5% to 14% above a plan that an in-process probe
confirms (benchmarks/RESULTS.md, "The fp32 checkpointed real-size gap is glibc's"). Under
mimalloc the same runs peak at the same figure every time, 10-16% lower, within 7% of the
plan, and (with PURGE_DELAY_MS) step faster. It comes as a pip wheel (``cmeel-mimalloc``, the
``mimalloc`` extra), so no root or system package is needed.

malloc can only be replaced before a process starts (``LD_PRELOAD``): torch's own allocations
go through the first malloc the dynamic linker binds. So the torchrun agent
(launch/torchrun.py) puts the library into the environment it starts the ranks with, and the
ranks plan their memory for the allocator they find mapped (:func:`active`); the launcher
plans for the one it will preload (:func:`for_ranks`). ``auto`` preloads it for CPU ranks
only: on a GPU the plan is the device's memory, and host allocation there is untested here.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

#: launcher.cpu_allocator's values.
SETTINGS = ("auto", "mimalloc", "glibc")
MIMALLOC = "mimalloc"
GLIBC = "glibc"  # the system's malloc (glibc's on Linux)
#: How the launcher tells the torchrun agent the setting (launch/local.py, slurm/train.sbatch).
ENV = "ORCHESTRATOR_CPU_ALLOCATOR"
#: How long mimalloc keeps a freed page before handing it back to the OS, in ms (its default:
#: 1,000 in v3). A training step frees and reallocates the same activations every few seconds;
#: at the default delay the pages went back between steps and faulted in again. Same 2-rank
#: real-size run, 2026-12-06 (benchmarks/RESULTS.md, "CPU ranks under mimalloc"): 461-494
#: tokens/s at 1 s, 586-596 at 10 s, 487-538 under glibc, the peak 1,440 MB at both delays
#: (never purging: 1,557). MIMALLOC_PURGE_DELAY in the environment wins.
PURGE_DELAY_MS = 10_000
#: Libraries that replace malloc when a user preloads one themselves; auto leaves them be.
_ALLOCATORS = ("mimalloc", "jemalloc", "tcmalloc")


class AllocatorError(RuntimeError):
    """launcher.cpu_allocator asks for a library that is not installed."""


def mimalloc_library() -> Optional[str]:
    """Path of the ``cmeel-mimalloc`` wheel's ``libmimalloc.so``, or None where it is not
    installed (found through the wheel's file list, wherever pip put it)."""
    from importlib import metadata

    try:
        files = metadata.distribution("cmeel-mimalloc").files or []
    except metadata.PackageNotFoundError:
        return None
    libs = sorted((f for f in files if f.name.startswith("libmimalloc.so")), key=lambda f: len(f.name))
    for f in libs:
        path = str(f.locate())
        if os.path.exists(path):
            return path
    return None


def _preloaded(env: Mapping[str, str]) -> Optional[str]:
    """The malloc replacement ``LD_PRELOAD`` already names, if any."""
    preload = env.get("LD_PRELOAD", "")
    return next((name for name in _ALLOCATORS if name in preload), None)


def for_ranks(setting: str, cuda: bool, env: Mapping[str, str] = os.environ) -> str:
    """The allocator ranks launched with ``setting`` run under: ``mimalloc`` or ``glibc``.
    Raises AllocatorError when ``mimalloc`` is asked for and not installed."""
    if setting not in SETTINGS:
        raise AllocatorError(f"launcher.cpu_allocator={setting!r} is not allowed; choose one of: "
                             f"{', '.join(SETTINGS)}")
    user = _preloaded(env)
    if setting == GLIBC or (setting == "auto" and (cuda or user)):
        return MIMALLOC if user == MIMALLOC else GLIBC
    if user == MIMALLOC or mimalloc_library():
        return MIMALLOC
    if setting == MIMALLOC:
        raise AllocatorError("launcher.cpu_allocator=mimalloc needs libmimalloc.so, which is not "
                             "installed (pip install cmeel-mimalloc), or choose auto or glibc")
    return GLIBC


def preload(env: MutableMapping[str, str], setting: str, cuda: bool) -> str:
    """Put mimalloc into ``env``'s ``LD_PRELOAD`` when ranks started with it should run under
    it (ahead of what the user preloads, which keeps working), with its purge delay
    (PURGE_DELAY_MS); returns the ranks' allocator."""
    chosen = for_ranks(setting, cuda, env)
    library = mimalloc_library()
    if chosen == MIMALLOC and _preloaded(env) != MIMALLOC and library:
        env["LD_PRELOAD"] = " ".join(filter(None, (library, env.get("LD_PRELOAD"))))
    if chosen == MIMALLOC:
        env.setdefault("MIMALLOC_PURGE_DELAY", str(PURGE_DELAY_MS))
    return chosen


def active() -> str:
    """The allocator this process runs under (``mimalloc`` when its library is mapped)."""
    try:
        with open("/proc/self/maps") as maps:
            return MIMALLOC if any("libmimalloc" in line for line in maps) else GLIBC
    except OSError:  # no /proc: not Linux, the system's malloc
        return GLIBC


def planned(setting: str) -> str:
    """The allocator a CPU plan is for: in a rank (torchrun set LOCAL_RANK), the one it runs
    under; in the launcher, ``orchestrate plan`` or a benchmark, the one launched ranks will."""
    if "LOCAL_RANK" in os.environ:
        return active()
    try:
        return for_ranks(setting, cuda=False)
    except AllocatorError:
        return GLIBC  # the launch refuses it (launch/prepare.py); a plan still answers


_RELEASE = None


def release_free_memory() -> None:
    """Hand freed pages back to the OS: ``mi_collect(true)`` under mimalloc, glibc's
    ``malloc_trim(0)`` otherwise; nothing where neither exists (musl, macOS)."""
    global _RELEASE
    if _RELEASE is None:
        import ctypes
        import ctypes.util

        _RELEASE = False
        try:
            if active() == MIMALLOC:
                collect = ctypes.CDLL(None).mi_collect
                collect.argtypes = [ctypes.c_bool]
                _RELEASE = lambda: collect(True)  # noqa: E731
            else:
                trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                _RELEASE = lambda: trim(0)  # noqa: E731
        except (OSError, AttributeError):
            pass
    if _RELEASE:
        _RELEASE()
