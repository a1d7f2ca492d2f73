"""Slurm launcher against a real Slurm (munge + slurmctld + two slurmd on this machine).

The dry-run rendering tests need no Slurm; the job tests skip only where Slurm cannot be
started (not root). CI runs as root, so it runs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import orchestrate, read_metrics

COMMON = [
    "trainer.precision=fp32", "lora.dropout=0.0", "trainer.eval_generate_examples=0",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "optim.lr=2e-3",
    "logger=basic", "logger.console=false", "trainer.seed=5",
]


def _submit(slurm, run_dir: Path, *overrides: str, env: dict | None = None) -> str:
    proc = orchestrate("train", "launcher=slurm", "launcher.nodes=2", "launcher.time=00:15:00",
                       f"run.dir={run_dir}", *COMMON, *overrides,
                       env={"SLURM_CONF": str(slurm.conf), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"script: {run_dir / 'job.sbatch'}" in proc.stdout
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    assert f"submitted Slurm job {job_id}" in proc.stdout
    assert f"log: {run_dir / ('slurm-' + job_id + '.out')}" in proc.stdout
    return job_id


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def _wait_for_steps(run_dir: Path, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [m for m in read_metrics(run_dir) if "loss" in m] if (run_dir / "metrics.jsonl").exists() else []
        if len(done) >= n:
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path, monkeypatch) -> None:
    """A two-node job trains; preempted (USR1), it checkpoints, requeues itself and resumes
    exactly: one job covers the plain two-node run and the requeue, a Slurm job start being
    the slow part."""
    from launch.status import run_status

    for key, value in slurm.env.items():  # `orchestrate status` asks this cluster's squeue
        monkeypatch.setenv(key, value)
    steps = 30
    requeued = None
    run_dir = tmp_path / "preempted"
    job = _submit(slurm, run_dir, f"trainer.max_steps={steps}")
    _wait_for_steps(run_dir, 3)
    out = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # The job checkpoints, exits and requeues itself, and Slurm holds a requeued job back for a
    # while (BeginTime); release it once the old incarnation is cleaned up. While the requeue is
    # under way Slurm briefly reports the old
    # incarnation's end state (seen in CI: FAILED, both before and after the job shows PENDING
    # again), so judge the outcome only once the second incarnation has started (its banner is
    # in the log) and its end state is stable.
    state, stable, deadline = "", 0, time.time() + 420
    idle_since = failed_polls = None
    while time.time() < deadline:
        state = slurm.squeue_state(job)
        pending_again = state == "PENDING" and slurm.job_field(job, "Restarts") == "1"
        if pending_again and requeued is None:
            requeued = run_status(run_dir)  # stopped at its checkpoint, the job pending again
        # Release only a few seconds after both nodes went idle. slurmd revokes the old
        # incarnation's credential with one-second resolution, and a launch within that second
        # is refused ("Job 2 already killed, do not launch batch job") and ends FAILED, as
        # seen in CI when the job was released the moment the nodes showed idle.
        idle = pending_again and slurm.nodes_idle()
        idle_since = (idle_since or time.time()) if idle else None
        if idle_since is not None and time.time() - idle_since >= 3:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm.env,
                           capture_output=True)
        started_again = "(restart 1)" in _log(run_dir, job)
        terminal = state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
        stable = stable + 1 if started_again and terminal else 0
        # An end state that holds for 20 s after the requeue without a second incarnation is the
        # outcome too: fail now with the logs rather than at the deadline.
        failed_polls = (failed_polls or 0) + 1 if terminal and requeued is not None and not started_again else None
        if stable >= 3 or (failed_polls or 0) >= 20:
            break
        time.sleep(1)
    log = _log(run_dir, job)
    assert state == "COMPLETED", log[-3000:] + slurm.controller_log(job)
    assert "USR1: asking ranks to checkpoint and stop" in log
    assert "requeueing job" in log and "(restart 1)" in log
    stopped_at = int(log.split("checkpoint saved at step ")[1].split(";")[0])
    assert 1 <= stopped_at < steps
    assert f"resuming at step {stopped_at}" in log
    assert "rendezvous at 127.0.0.1:" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == 2
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert requeued is not None and requeued.job == f"{job} PENDING", requeued
    assert requeued.state == "stopped" and requeued.step == stopped_at, requeued
    assert requeued.checkpoint == f"step-{stopped_at:08d}", requeued
    done = run_status(run_dir)
    assert (done.state, done.step, done.total) == ("finished", steps, steps), done

    # Same steps and losses as an uninterrupted local run of the same config on 2 ranks.
    ref_dir = tmp_path / "uninterrupted"
    proc = orchestrate("train", f"run.dir={ref_dir}", "launcher.nproc_per_node=2",
                       f"trainer.max_steps={steps}", *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]
    want = [(m["step"], m["loss"]) for m in read_metrics(ref_dir) if "loss" in m]
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert got == want


def test_dry_run_renders_multi_node_gpu_script(tmp_path) -> None:
    run_dir = tmp_path / "dry"
    proc = orchestrate(
        "train", "launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8",
        "launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high",
        "launcher.time=12:00:00", "launcher.cpus_per_task=64", "launcher.mem=0",
        "launcher.exclusive=true", "launcher.constraint=h100", "launcher.signal_grace_s=300",
        'launcher.extra_sbatch=["--mail-type=END"]',
        'launcher.setup=["module load cuda/12.4","source /opt/venv/bin/activate"]',
        'launcher.env=["NCCL_DEBUG=WARN","NCCL_IB_DISABLE=0"]', "launcher.dry_run=true",
        "strategy=fsdp", "trainer.global_batch_size=256", f"run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script == (run_dir / "job.sbatch").read_text()
    for line in [
        "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64", "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
        "#SBATCH --mem=0", "#SBATCH --exclusive", "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue", "#SBATCH --mail-type=END", "module load cuda/12.4",
        "source /opt/venv/bin/activate", "export NCCL_DEBUG=WARN", "export NCCL_IB_DISABLE=0",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
        "export ORCHESTRATOR_CPU_ALLOCATOR=auto",  # launch.torchrun decides on the node
        "--nnodes=4 --nproc_per_node=8",
        '--rdzv_backend=c10d --rdzv_endpoint="${HEAD_ADDR}:${RDZV_PORT}" --rdzv_id="${SLURM_JOB_ID}"',
        "scontrol requeue",
    ]:
        assert line in script, line
    assert not (run_dir / "slurm_job_id").exists()
    result = subprocess.run(["bash", "-n", str(run_dir / "job.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # valid shell


def test_values_cannot_inject_shell(tmp_path) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "we ird $(touch pwned)"
    proc = orchestrate(
        "train", "launcher=slurm", "launcher.dry_run=true", f"run.dir='{run_dir}'",
        f"launcher.job_name='x; touch {marker}'", f"launcher.time='1:00:00 $(touch {marker})'",
        f"launcher.env=['A=1; touch {marker}']",
    )
    assert proc.returncode == 0, proc.stderr
    script = (run_dir / "job.sbatch").read_text()
    # Run every non-directive line with srun/scontrol stubbed out: nothing gets touched.
    stub = tmp_path / "bin"
    stub.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (stub / name).write_text("#!/bin/sh\nexit 0\n")
        (stub / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1"}
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert not marker.exists()
    assert not (tmp_path / "pwned").exists()
    assert f"export A='1; touch {marker}'" in script


@pytest.mark.slow
def test_scancel_checkpoints_and_a_local_launch_resumes(slurm, tmp_path) -> None:
    """Plain `scancel` (SIGTERM to every process of the job, SIGKILL after KillWait): the ranks
    checkpoint at the next step boundary, the job is not requeued, and a local launch resumes."""
    steps = 12
    run_dir = tmp_path / "cancelled"
    job = _submit(slurm, run_dir, f"trainer.max_steps={steps}",
                  env={"ORCHESTRATOR_TEST_STEP_SECONDS": "0.3"})  # scancel lands mid-run
    assert json.loads((run_dir / "run.lock").read_text())["slurm_job_id"] == job  # pending: it owns R
    refused = orchestrate("train", "launcher=slurm", "launcher.nodes=2", "launcher.time=00:15:00",
                          f"run.dir={run_dir}", *COMMON, f"trainer.max_steps={steps}",
                          env={"SLURM_CONF": str(slurm.conf)})
    assert refused.returncode == 2 and f"in use by another run: Slurm job {job}" in refused.stderr
    _wait_for_steps(run_dir, 3)
    out = subprocess.run(["scancel", job], env=slurm.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "exit_code").exists():
        time.sleep(0.5)
    log = _log(run_dir, job)
    assert "SIGTERM: the ranks checkpoint at the next step boundary" in log, log[-3000:]
    assert "not requeued" in log and "requeueing" not in log
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "stopped" and state["reason"] == "SIGTERM", state
    stopped_at = state["step"]
    assert 3 <= stopped_at < steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    assert slurm.wait(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120) == "CANCELLED"
    assert "Traceback" not in _log(run_dir, job)

    resumed = orchestrate("train", f"run.dir={run_dir}", "launcher.nproc_per_node=2",
                          f"trainer.max_steps={steps}", *COMMON)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
