"""Fault injection on real 2-rank runs: killed ranks, a kill during a checkpoint write, NaNs and
a hung rank. Each run that recovers must end with the adapter of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, orchestrate, read_metrics

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = [
    "launcher.nproc_per_node=2", "trainer.precision=fp32", "lora.dropout=0.0",
    f"trainer.max_steps={STEPS}", "trainer.save_every=2", "trainer.keep_last_n=2",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    "trainer.eval_generate_examples=0", "optim.lr=2e-3", "logger=basic", "logger.console=false",
    "trainer.seed=3",
]


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] == y[k]).all(), k


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reliability") / "reference"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch.worker" in cmd and str(run_dir).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _start_and_kill_rank1(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Start a run; once the step-4 checkpoint is complete (rank 1 then waits at step 5, so the
    kill lands at a known point), kill -9 rank 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "train", f"run.dir={run_dir}", *COMMON, *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ORCHESTRATOR_TEST_FAULT": "hang:5:1"},  # rank 1 waits at step 5
    )
    deadline = time.time() + 300
    pid = None
    while time.time() < deadline:
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists() and latest.read_text().strip() == "step-00000004":
            pid = _worker_pid(run_dir, 1)
            if pid:
                break
        time.sleep(0.2)
    assert pid, "rank 1 never reached the step-4 checkpoint"
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_killed_rank_with_restarts_resumes_by_itself(reference, tmp_path) -> None:
    for attempt in range(2):
        run_dir = tmp_path / f"restart{attempt}"
        done = _start_and_kill_rank1(run_dir, "launcher.max_restarts=1", "launcher.dist_timeout_s=60")
        # Guard: before init_distributed used a per-attempt store prefix, the restarted group
        # sometimes dialled the dead rank's stale gloo address ("connectFullMesh ... Connection
        # refused"). Should that ever recur, try the whole scenario once more before failing.
        if done.returncode == 0 or "connectFullMesh" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming at step" in done.stderr
    assert _losses(run_dir)[-1][0] == STEPS
    _assert_same_adapter(run_dir, reference)


def test_killed_rank_without_restarts_fails_clearly_and_resumes(reference, tmp_path) -> None:
    run_dir = tmp_path / "norestart"
    done = _start_and_kill_rank1(run_dir, "launcher.dist_timeout_s=60")
    assert done.returncode != 0
    assert f"can be resumed with orchestrate train run.dir={run_dir}" in done.stderr
    assert not (run_dir / "summary.json").exists()
    again = orchestrate("train", f"run.dir={run_dir}", *COMMON)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 4" in again.stderr
    assert _losses(run_dir) == _losses(reference)
    _assert_same_adapter(run_dir, reference)


def test_kill_during_checkpoint_write_keeps_previous(reference, tmp_path) -> None:
    run_dir = tmp_path / "ckpt_crash"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON,
                       env={"ORCHESTRATOR_TEST_FAULT": "checkpoint_write:4:0"})
    assert proc.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").exists()  # the partial write, never used
    again = orchestrate("train", f"run.dir={run_dir}", *COMMON)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 2" in again.stderr
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006", "step-00000008"]
    _assert_same_adapter(run_dir, reference)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "nan_stop"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, env={"ORCHESTRATOR_TEST_FAULT": "nan_loss:5"})
    assert proc.returncode != 0
    assert "non-finite loss at step 5" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"


def test_nan_skip_goes_on(tmp_path) -> None:
    run_dir = tmp_path / "nan_skip"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, "trainer.on_nonfinite=skip",
                       env={"ORCHESTRATOR_TEST_FAULT": "nan_loss:5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 5: update skipped" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == STEPS
    skipped = [m for m in read_metrics(run_dir) if m.get("skipped")]
    assert [m["step"] for m in skipped] == [5]


def test_hung_rank_times_out_naming_rank_and_operation(tmp_path) -> None:
    run_dir = tmp_path / "hang"
    start = time.time()
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, "launcher.dist_timeout_s=10",
                       env={"ORCHESTRATOR_TEST_FAULT": "hang:3:1"})
    assert proc.returncode != 0
    assert time.time() - start < 120
    assert ("error: rank 0: a collective timed out after 10 s (launcher.dist_timeout_s) during "
            "step 3 forward/backward") in proc.stderr
