"""What would fail after minutes is refused before launch (an unwritable run directory, a memory
plan above the host's budget, a filesystem without room for two checkpoints); what cannot be
foreseen (the disk filling up mid-run) stops cleanly at the failed checkpoint and resumes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import orchestrate, read_metrics

pytestmark = pytest.mark.slow

COMMON = [
    "launcher.nproc_per_node=2", "trainer.precision=fp32",
    "trainer.max_steps=8", "trainer.save_every=2", "trainer.keep_last_n=2",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    "trainer.eval_generate_examples=0", "logger=basic", "logger.console=false",
    # Far below two CPU ranks' ~1.3 GiB: refused unless overridden.
    "plan.host_memory_gb=0.5",
]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_unwritable_run_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = orchestrate("train", "run.dir=/proc/nope/run", "trainer.max_steps=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: run.dir='/proc/nope/run' cannot be created: writing in "
                                   "/proc fails (No such file or directory)")
    from launch.budget import BudgetError
    from launch.diskspace import check_run_dir

    a_file = tmp_path / "file"
    a_file.write_text("")
    run = SimpleNamespace(dir=None, root=str(a_file / "runs"))
    with pytest.raises(BudgetError, match=f"run.root='{a_file}/runs' cannot be created: {a_file} is not a directory"):
        check_run_dir(SimpleNamespace(run=run))


def test_memory_plan_above_host_budget_is_refused_before_any_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: memory plan does NOT fit: peak 2 ranks x ")
    assert "exceeds 0.50 GiB on this host (plan.host_memory_gb)" in line
    assert line.endswith("plan.enforce=false launches anyway")
    assert not run_dir.exists()  # nothing was started or written


def _mount_tmpfs(path: Path, size: str, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path):
    """A tmpfs of 1 MiB (grown by the test); mounting needs root, which CI has."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot mount the small tmpfs this test fills (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount_tmpfs(mnt, "1m")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _fault_at_step(small_fs: Path, run_dir: Path, step: int, fault, *extra: str) -> subprocess.CompletedProcess:
    """Launch with rank 0 held at the start of ``step``; there ``fault()`` breaks the
    filesystem for real (full to the last block, or read-only), then the rank goes on."""
    import sys
    import time

    from conftest import ROOT

    signals = small_fs.parent / "signals"  # off the broken filesystem
    signals.mkdir(exist_ok=True)
    env = {**os.environ, "ORCHESTRATOR_TEST_FAULT": f"wait:{step}:0", "ORCHESTRATOR_TEST_SIGNAL_DIR": str(signals)}
    proc = subprocess.Popen([sys.executable, "-m", "launch", "train", f"run.dir={run_dir}", *DISK_RUN, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (signals / "WAITING").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    try:
        fault()
    except BaseException:
        proc.kill()  # the launcher; its ranks follow when their parent is gone
        (signals / "CONTINUE").touch()
        raise
    (signals / "CONTINUE").touch()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _steps(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


#: 8 steps, a checkpoint every 3 (3, 6, 8), the default lora.dropout (the resumes must be exact
#: with its random draws), the memory plan above COMMON's 0.5 GiB host budget let through.
DISK_RUN = [*COMMON, "trainer.save_every=3", "plan.enforce=false"]


def test_full_disk_refused_then_checkpoint_failure_stops_cleanly_and_resumes(small_fs: Path) -> None:
    """Issue #27's scenario, each fault a real one: a read-only remount mid-run, then the disk
    filled to the last block by another process; each ends in one line with exit code 4, the
    last complete checkpoint kept and named, and the run resumes exactly once the disk is back."""
    run_dir = small_fs / "run"
    refused = orchestrate("train", f"run.dir={run_dir}", *COMMON, "plan.host_memory_gb=64")
    assert refused.returncode == 2
    line = _one_error_line(refused.stderr)
    assert line.startswith("error: 1.0 MiB free on the run directory's filesystem")
    assert "two checkpoints" in line and "plus the adapter" in line
    assert not run_dir.exists()

    _mount_tmpfs(small_fs, "24m", remount=True)
    ckpts = run_dir / "checkpoints"

    def read_only() -> None:
        # The kernel refuses to remount a filesystem read-only while files on it are open for
        # writing (the lock, metrics.jsonl): EBUSY. What NFS and Lustre clients do on errors
        # is forced; here the checkpoint directory becomes a read-only mount of itself, so the
        # checkpoint's writes get the kernel's EROFS (bookkeeping under a whole read-only
        # filesystem: test_bookkeeping_writes_on_a_full_or_read_only_disk_warn_once_and_keep_the_old).
        subprocess.run(["mount", "--bind", str(ckpts), str(ckpts)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ckpts)], check=True)

    try:
        first = _fault_at_step(small_fs, run_dir, 5, read_only)
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)
    assert first.returncode == 4, first.stderr[-3000:]
    line = _one_error_line(first.stderr)
    assert line.startswith("error: checkpoint at step 6 could not be written: Read-only file system")
    assert line.endswith(f"started again with run.dir={run_dir} the run resumes from step 3")
    assert (ckpts / "latest").read_text().strip() == "step-00000003"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000003"]  # nothing partial
    losses = _steps(run_dir)

    fill = small_fs / "fill"
    full = lambda: subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=64k"], capture_output=True)  # noqa: E731
    second = _fault_at_step(small_fs, run_dir, 7, full, "logger=wandb")  # W&B offline on the full disk too
    assert second.returncode == 4, second.stderr[-3000:]
    line = _one_error_line(second.stderr)
    assert line.startswith("error: checkpoint at step 8 could not be written: No space left on device")
    assert f"the last complete checkpoint is step-00000006 ({ckpts / 'step-00000006'})" in line
    assert "resuming at step 3" in second.stderr
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    assert not list(ckpts.glob(".tmp-*")) and not (run_dir / "summary.json").exists()
    status = orchestrate("status", str(run_dir))  # the reserve held the state's last words
    assert "failed (disk full: checkpoint at step 8 not written; resumable from step 6)" in status.stdout
    assert all(losses[k] == v for k, v in _steps(run_dir).items() if k in losses)  # resumed exactly
    losses.update(_steps(run_dir))

    # The planner's checkpoint size against the real one.
    from launch.diskspace import checkpoint_bytes
    from launch.prepare import build_config
    from orchestrator.plan import plan_for_run

    real = sum(f.stat().st_size for f in (ckpts / "step-00000006").rglob("*") if f.is_file())
    planned = checkpoint_bytes(plan_for_run(build_config(COMMON), 2, "cpu", 4), 2)
    assert abs(planned - real) / real < 0.1, (planned, real)

    fill.unlink()  # space is back
    again = orchestrate("train", f"run.dir={run_dir}", *DISK_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 6" in again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert sorted(_steps(run_dir)) == list(range(1, 9))
    assert all(losses[k] == v for k, v in _steps(run_dir).items() if k in losses), (losses, _steps(run_dir))
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006", "step-00000008"]


def test_write_failure_without_a_complete_checkpoint_says_so(small_fs: Path) -> None:
    """A real ENOSPC inside one write phase, in-process (one rank, no process group)."""
    import torch

    from orchestrator.checkpoint import CheckpointWriteError, _agreed
    from orchestrator.distributed import DistInfo

    run_dir = small_fs / "run"
    partial = run_dir / "adapter"
    partial.mkdir(parents=True)
    dist = DistInfo(0, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(CheckpointWriteError) as err:
        with _agreed(run_dir, "adapter after step 8", partial, dist):
            (partial / "adapter_model.safetensors").write_bytes(b"\0" * 2 * 2**20)
    assert str(err.value) == (
        f"adapter after step 8 could not be written: No space left on device "
        f"({partial}); training stopped and the partial adapter was "
        f"removed; there is no complete checkpoint yet; started again with run.dir={run_dir} the "
        "run begins at step 0")
    assert not partial.exists()


def test_bookkeeping_writes_on_a_full_or_read_only_disk_warn_once_and_keep_the_old(small_fs: Path,
                                                                                     caplog) -> None:
    """state.json, summary.json, eval answers and curves.png record the run; on a really full
    disk (no room for a small file) or one remounted read-only, each is one warning, the last
    version written stays whole, and nothing raises (a full disk at the end of a finished run
    must not turn it into a failure)."""
    import logging

    from launch.report import write_curves
    from orchestrator import rundir

    run_dir = small_fs / "run"
    run_dir.mkdir()
    assert rundir.write_state(run_dir, "running", step=3)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    subprocess.run(["dd", "if=/dev/zero", f"of={small_fs / 'fill'}", "bs=64k"], capture_output=True)
    with pytest.raises(OSError):
        (small_fs / "probe").write_text("x" * 8192)  # really full
    rundir._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        for step in (4, 5):
            assert not rundir.write_state(run_dir, "failed", step=step, reason="disk full")
        assert not rundir.write_bookkeeping(run_dir / "summary.json", "{}" * 4096, "the run's summary")
        assert write_curves([run_dir], run_dir / "curves.png") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("No space left on device" in w for w in warnings), warnings
    assert rundir.read_state(run_dir)["step"] == 3  # the previous state, whole
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "state.json"]  # no temp files
    _cache_write_fails(small_fs, "No space left on device")
    from launch.prepare import UsageError, _lock  # the launcher's lock, on a disk that filled after preflight

    with pytest.raises(UsageError, match=f"^run.dir='{small_fs / 'other'}' cannot be written: No space left on device"):
        _lock(small_fs / "other")

    (small_fs / "fill").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        rundir._WARNED.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            assert not rundir.write_state(run_dir, "failed", step=6)
        assert "Read-only file system" in caplog.records[0].getMessage()
        assert rundir.read_state(run_dir)["step"] == 3
        _cache_write_fails(small_fs, "Read-only file system")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)


def _cache_write_fails(fs: Path, error: str) -> None:
    """Data preparation's cache on a broken filesystem: one DataError line (the launcher's exit
    2, before any rank starts) naming the cache and the fix, and no partial entry left."""
    from orchestrator.config import ASSETS_DIR, DataConfig, ModelConfig
    from orchestrator.data import DataError, prepare
    from orchestrator.model import load_tokenizer

    cache = fs / "cache"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    cfg = DataConfig(path=str(ASSETS_DIR / "tiny_instruct" / "train.jsonl"), cache_dir=str(cache))
    with pytest.raises(DataError, match=f"^the tokenized data could not be written to the cache at {cache}: "
                                        f"{error} .*set data.cache_dir to another filesystem$"):
        prepare(cfg, load_tokenizer(ModelConfig(path=str(ASSETS_DIR / "tiny-llama"))))
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before

