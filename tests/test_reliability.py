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

from launch.status import run_status
from conftest import ROOT, orchestrate, read_metrics

pytestmark = pytest.mark.slow

STEPS = 8
# lora.dropout=0.1, twice the default (the default's exact resumes are test_refuse's and
# test_continue's): dropout is training's one random draw, so whether a resumed run draws the
# uninterrupted run's masks (each micro-batch seeds them from its examples, data/batches.py)
# decides whether it equals that run bit for bit.
COMMON = [
    "launcher.nproc_per_node=2", "trainer.precision=fp32", "lora.dropout=0.1",
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
    """No retry: the restarted group once dialled the dead rank's stale gloo address
    ("connectFullMesh ... Connection refused"), which the per-attempt store prefix in
    init_distributed fixed; a second try here would hide that bug coming back."""
    run_dir = tmp_path / "restart"
    done = _start_and_kill_rank1(run_dir, "launcher.max_restarts=1", "launcher.dist_timeout_s=60")
    assert "connectFullMesh" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming at step" in done.stderr
    assert _losses(run_dir)[-1][0] == STEPS
    _assert_same_adapter(run_dir, reference)


def test_crashes_fail_clearly_and_resume_exactly(reference, tmp_path) -> None:
    """One run directory through two crashes, each resumed by a plain relaunch: a rank dying
    in the middle of a checkpoint write (the partial write is never used), then rank 1 killed
    -9 without restarts. The finished run equals the uninterrupted one."""
    run_dir = tmp_path / "crashes"
    ckpts = run_dir / "checkpoints"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON,
                       env={"ORCHESTRATOR_TEST_FAULT": "checkpoint_write:4:0"})
    assert proc.returncode != 0
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").exists()  # the partial write, never used

    done = _start_and_kill_rank1(run_dir, "launcher.dist_timeout_s=60")
    assert "resuming at step 2" in done.stderr
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert done.returncode != 0
    assert f"can be resumed with orchestrate train run.dir={run_dir}" in done.stderr
    assert not (run_dir / "summary.json").exists()

    again = orchestrate("train", f"run.dir={run_dir}", *COMMON)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 4" in again.stderr
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006", "step-00000008"]
    assert _losses(run_dir) == _losses(reference)
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


# -- interrupts, time-based checkpoints, one writer per run directory (issue #20) ------------

INTERVAL_S = 0.6
TIMED = [o for o in COMMON if not o.startswith("trainer.save_every=")] + [
    "trainer.save_every=0", f"trainer.save_every_minutes={INTERVAL_S / 60}"]


def _launch(run_dir: Path, fault: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch", "train", f"run.dir={run_dir}", *TIMED], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ORCHESTRATOR_TEST_FAULT": fault, **env},
    )


def _wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (rc={proc.returncode}) before {what}: {err[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _stop_at_pause(run_dir: Path, step: int, send) -> tuple[int, str, str]:
    """Resume with rank 1 held at the start of ``step``; ``send(proc)`` a signal there, release
    the rank, and return the launcher's exit code and output."""
    (run_dir / "WAITING").unlink(missing_ok=True)  # left by the killed run's hung rank
    proc = _launch(run_dir, f"wait:{step}:1")
    _wait_for(proc, lambda: (run_dir / "WAITING").exists(), f"rank 1 waiting at step {step}")
    send(proc)
    (run_dir / "CONTINUE").touch()
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in out + err, err[-3000:]
    return proc.returncode, out, err


def _latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])


def test_interrupts_checkpoint_and_resume_exactly(reference, tmp_path) -> None:
    """One run directory through every way a run is interrupted, then finished: its losses and
    adapter equal an uninterrupted run's (fp32)."""
    from launch.local import _descendants

    run_dir = tmp_path / "interrupted"
    # 1. Time-based checkpoints only (no step setting); rank 1 waits at step 4 while a second
    #    launch into the directory is refused; then rank 1 hangs at step 6 and the whole run is
    #    killed with kill -9 (launcher, torchrun and both ranks), as a crashed node would be.
    first = _launch(run_dir, "wait:4:1,hang:6:1", ORCHESTRATOR_TEST_STEP_SECONDS="0.3")
    _wait_for(first, lambda: (run_dir / "WAITING").exists(), "rank 1 waiting at step 4")
    frozen = {f: (run_dir / f).stat().st_mtime_ns for f in ("config.yaml", "overrides.yaml")}
    second = orchestrate("train", f"run.dir={run_dir}", *TIMED)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run.dir={run_dir} is in use by another run: "
                                                   f"pid {first.pid} on "), second.stderr
    assert first.poll() is None  # undisturbed: still running, its files untouched
    assert {f: (run_dir / f).stat().st_mtime_ns for f in frozen} == frozen
    running = run_status(run_dir)  # `orchestrate status` of a running run: its state and step
    assert running.state == "running" and running.step == _losses(run_dir)[-1][0] >= 3, running
    assert running.total == STEPS and running.eta_s is not None and running.eta_s > 0, running
    (run_dir / "CONTINUE").touch()
    _wait_for(first, lambda: (run_dir / "WAITING").exists() and _losses(run_dir)[-1][0] == 5,
              "rank 1 asleep in step 6, after steps 4 and 5 and any checkpoint at step 5")
    for pid in [first.pid, *_descendants(first.pid)]:
        os.kill(pid, signal.SIGKILL)
    first.communicate()
    crashed_at = _latest_step(run_dir)
    lost = [m["step_time_s"] for m in read_metrics(run_dir) if "loss" in m and m["step"] > crashed_at]
    assert 1 <= crashed_at <= 5 and sum(lost) < INTERVAL_S, (crashed_at, lost)
    dead = run_status(run_dir)  # state.json still says running, but nothing holds the lock
    assert dead.state == "failed" and "died" in dead.detail, dead

    # 2. A launch resumes despite the dead run's lock record; Ctrl-C (SIGINT to the launcher)
    #    stops it at the step reached with a checkpoint, exit code 130 and one line.
    rc, out, err = _stop_at_pause(run_dir, 6, lambda p: os.kill(p.pid, signal.SIGINT))
    assert f"resuming at step {crashed_at}" in err
    assert rc == 130, err[-3000:]
    hint = (f"the run can be resumed with orchestrate train run.dir={run_dir} from step 6 "
            f"(checkpoint {run_dir}/checkpoints/step-00000006)")
    assert err.strip().splitlines()[-1] == f"stopped on SIGINT at step 6: {hint}"
    assert _latest_step(run_dir) == 6
    assert json.loads((run_dir / "state.json").read_text())["state"] == "stopped"
    status = orchestrate("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    row = status.stdout.splitlines()[1].split()
    assert row[:3] == ["interrupted", "stopped", "(SIGINT)"] and "step-00000006" in row, status.stdout

    # 3. SIGTERM to one rank: the same agreed stop, exit code 143.
    rc, out, err = _stop_at_pause(run_dir, 7, lambda p: os.kill(_worker_pid(run_dir, 1), signal.SIGTERM))
    assert rc == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped on SIGTERM at step 7: ")
    assert _latest_step(run_dir) == 7

    # 4. Finish: the same losses and adapter as the uninterrupted run.
    done = orchestrate("train", f"run.dir={run_dir}", *TIMED)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 7" in done.stderr
    assert _losses(run_dir) == _losses(reference)
    _assert_same_adapter(run_dir, reference)
    done_status = run_status(run_dir)
    assert (done_status.state, done_status.step, done_status.total) == ("finished", STEPS, STEPS), done_status


def test_run_lock_refuses_a_live_holder_and_takes_over_its_own_job(tmp_path, monkeypatch) -> None:
    from orchestrator import rundir

    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    hold = ("import sys, time; from orchestrator import rundir; rundir.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    for job in (None, "4242"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
        if job:
            env["SLURM_JOB_ID"] = job
        holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        if job is None:
            with pytest.raises(rundir.RunDirBusy, match=f"in use by another run: pid {holder.pid} on "):
                rundir.acquire(tmp_path)
            holder.kill()  # kill -9: the kernel drops the flock; the stale record blocks nothing
            holder.wait()
            rundir.acquire(tmp_path).release()
        else:  # a requeued Slurm job (same id) takes the directory over from its old self;
            monkeypatch.setenv("SLURM_JOB_ID", job)  # a second launch in the same job does not
            with pytest.raises(rundir.RunDirBusy, match=f"Slurm job {job} \\(pid {holder.pid} on "):
                rundir.acquire(tmp_path)
            monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
            lock = rundir.acquire(tmp_path)
            assert rundir.read_record(tmp_path)["pid"] == os.getpid()
            lock.release()
            holder.kill()
            holder.wait()


def test_deepspeed_starts_after_a_build_killed_holding_torchs_lock() -> None:
    """torch guards its extension builds with a bare lock file; a rank killed while loading
    DeepSpeed's CPU collective op leaves it, and every later DeepSpeed run used to wait on it
    forever (CI hung 600 s on one). The next run now removes it and loads the op."""
    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "from torch.utils.cpp_extension import _get_build_directory\n"
        "from orchestrator.strategies.deepspeed import load_jit_ops\n"
        "logging.basicConfig()\n"
        "name = get_accelerator().create_op_builder('ShareMemCommBuilder').name\n"
        "lock = Path(_get_build_directory(name, verbose=False)) / 'lock'\n"
        "lock.touch()\n"
        "load_jit_ops()\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "assert build_shm_op() is not None and not lock.exists()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left by a build of deepspeed_shm_comm that was killed" in proc.stderr
