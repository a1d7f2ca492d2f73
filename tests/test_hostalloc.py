"""The CPU ranks' host allocator (launcher.cpu_allocator): which malloc ranks get, how it is
preloaded, what is refused, and that releasing freed memory works under mimalloc. In-process,
plus one short interpreter under the preload (no torch). The ranks of the shared 2-rank run
really running under it: tests/test_plan.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.errors import UsageError
from launch.prepare import build_config, check_packages
from orchestrator import hostalloc

LIBRARY = hostalloc.mimalloc_library()
needs_wheel = pytest.mark.skipif(LIBRARY is None, reason="cmeel-mimalloc is not installed")


@needs_wheel
def test_cpu_ranks_get_mimalloc_and_gpu_ranks_and_user_preloads_keep_theirs():
    assert hostalloc.for_ranks("auto", cuda=False, env={}) == "mimalloc"
    assert hostalloc.for_ranks("auto", cuda=True, env={}) == "glibc"  # the plan is the GPU's
    assert hostalloc.for_ranks("mimalloc", cuda=True, env={}) == "mimalloc"
    assert hostalloc.for_ranks("glibc", cuda=False, env={}) == "glibc"
    # A malloc the user preloads is theirs: auto adds nothing, and a plan names what runs.
    jemalloc = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert hostalloc.for_ranks("auto", cuda=False, env=jemalloc) == "glibc"
    env = dict(jemalloc)
    assert hostalloc.preload(env, "auto", cuda=False) == "glibc" and env == jemalloc

    env = {"LD_PRELOAD": "/opt/lib/libprofiler.so"}  # not a malloc: kept, after mimalloc
    assert hostalloc.preload(env, "auto", cuda=False) == "mimalloc"
    assert env["LD_PRELOAD"] == f"{LIBRARY} /opt/lib/libprofiler.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "10000"  # freed activations kept between steps
    mine = {"MIMALLOC_PURGE_DELAY": "0"}
    hostalloc.preload(mine, "auto", cuda=False)
    assert mine["MIMALLOC_PURGE_DELAY"] == "0"  # the user's setting wins
    again = dict(env)
    hostalloc.preload(again, "auto", cuda=False)  # a restart of the agent: not preloaded twice
    assert again == env
    gpu = {}
    assert hostalloc.preload(gpu, "auto", cuda=True) == "glibc" and "LD_PRELOAD" not in gpu


def test_missing_or_unknown_allocator_is_refused_with_what_to_do(monkeypatch):
    with pytest.raises(UsageError, match=r"launcher.cpu_allocator='tcmalloc' is not allowed; "
                                         r"choose one of: auto, mimalloc, glibc"):
        build_config(["launcher.cpu_allocator=tcmalloc"])
    cfg = build_config(["launcher.cpu_allocator=mimalloc"])
    monkeypatch.setattr(hostalloc, "mimalloc_library", lambda: None)  # a machine without the wheel
    with pytest.raises(UsageError, match=r"needs libmimalloc.so, which is not installed "
                                         r"\(pip install cmeel-mimalloc\)"):
        check_packages(cfg)
    # auto falls back to the system's malloc, and plans for it.
    assert hostalloc.for_ranks("auto", cuda=False, env={}) == "glibc"
    assert hostalloc.planned("auto") == "glibc"
    check_packages(build_config([]))


@needs_wheel
def test_release_returns_freed_pages_under_mimalloc():
    """What runs before each evaluation (distributed.release_free_host_memory), in a process
    that runs under the preload: it sees mimalloc, and its collect hands back the pages of
    freed activation-sized blocks, which mimalloc otherwise keeps until it allocates again
    (glibc's trim, with 100 KB heap chunks: tests/test_plan.py)."""
    code = """
from orchestrator import hostalloc

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

assert hostalloc.active() == "mimalloc", hostalloc.active()
blocks = [bytearray(1_000_000) for _ in range(100)]
for b in blocks:
    b[::4096] = b"\\1" * len(b[::4096])
del blocks[::2]
before = rss_mb()
hostalloc.release_free_memory()
print(before - rss_mb())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "LD_PRELOAD": LIBRARY})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) > 30, proc.stdout
