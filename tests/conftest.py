"""Shared fixtures: the real CLI in a subprocess, and one trained run reused by several tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small and fast, but long enough for losses to move: used by the multi-rank tests.
FAST = [
    "trainer.max_steps=12", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
    "trainer.eval_generate_examples=32", "trainer.eval_max_new_tokens=8", "optim.lr=2e-3",
    "optim.warmup_steps=2", "logger.console=false",
]


# ORCHESTRATOR_TEST_PRECISION=fp32|bf16 makes the suite run as on the other kind of CI machine:
# `auto` precision picks bf16 on CPUs with AVX512-BF16/AMX and fp32 on the others, and the
# override of that detection (ORCHESTRATOR_CPU_BF16, distributed._cpu_has_native_bf16) reaches
# every launch, in-process run, generation and plan of the suite. Tests that set
# trainer.precision keep theirs.
_FORCED = {"fp32": "0", "bf16": "1"}.get(os.environ.get("ORCHESTRATOR_TEST_PRECISION", ""))
if _FORCED:
    os.environ["ORCHESTRATOR_CPU_BF16"] = _FORCED


def orchestrate(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m launch ARGS`` (the ``orchestrate`` console script) and capture output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def rewind(run_dir: Path, step: int) -> None:
    """Make ``run_dir`` look as if it had stopped right after the checkpoint of ``step``."""
    import shutil

    ckpts = run_dir / "checkpoints"
    for ckpt in ckpts.glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (ckpts / "latest").write_text(f"step-{step:08d}")
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real Slurm (munge, slurmctld, two slurmd) for one test module; skips where it cannot
    start (not root). Its ports are fixed: one cluster at a time on a machine."""
    from slurm_cluster import LocalSlurm, SlurmUnavailable

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        # Where Slurm can run (root; CI runs as root), a cluster that fails to start is a
        # failure with its reason, not a skip that silently drops the requeue, scancel and
        # job-array tests from a green run. Only a non-root machine skips.
        if os.environ.get("CI") == "true" or os.geteuid() == 0:
            pytest.fail(f"the test Slurm cluster did not start: {exc}")
        pytest.skip(f"no Slurm here (not root): {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> Path:
    """One real `orchestrate train` on 2 CPU ranks, shared by the end-to-end tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    proc = orchestrate("train", f"run.dir={run_dir}", "launcher.nproc_per_node=2", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir.parent / "ddp.stdout").write_text(proc.stdout)  # the launcher's console, for tests
    return run_dir
