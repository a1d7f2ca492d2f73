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
    "launcher.nproc_per_node=2", "trainer.precision=fp32", "lora.dropout=0.0",
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


def test_full_disk_refused_then_checkpoint_failure_stops_cleanly_and_resumes(small_fs: Path) -> None:
    run_dir = small_fs / "run"
    override = ["plan.enforce=false"]  # the memory plan above plan.host_memory_gb, overridden
    refused = orchestrate("train", f"run.dir={run_dir}", *COMMON, "plan.host_memory_gb=64")
    assert refused.returncode == 2
    line = _one_error_line(refused.stderr)
    assert line.startswith("error: 1.0 MiB free on the run directory's filesystem")
    assert "two checkpoints" in line and "plus the adapter" in line
    assert not run_dir.exists()

    # Room for two checkpoints and the adapter, not for the third that keep_last_n=2 needs
    # while writing: step 6 fails, with step 4 complete.
    _mount_tmpfs(small_fs, "12m", remount=True)
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, *override)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "launching anyway (plan.enforce=false)" in proc.stderr
    assert "a later checkpoint may fail for space" in proc.stderr
    line = _one_error_line(proc.stderr)
    ckpts = run_dir / "checkpoints"
    assert line.startswith("error: checkpoint at step 6 could not be written: No space left on device")
    assert f"the last complete checkpoint is step-00000004 ({ckpts / 'step-00000004'})" in line
    assert line.endswith(f"started again with run.dir={run_dir} the run resumes from step 4")
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert (ckpts / "step-00000004" / "trainer_state.json").exists()
    assert not (ckpts / ".tmp-step-00000006").exists()
    assert not (run_dir / "summary.json").exists()

    # The planner's checkpoint size against the real one.
    from launch.diskspace import checkpoint_bytes
    from launch.prepare import build_config
    from orchestrator.plan import plan_for_run

    real = sum(f.stat().st_size for f in (ckpts / "step-00000004").rglob("*") if f.is_file())
    planned = checkpoint_bytes(plan_for_run(build_config(COMMON), 2, "cpu", 4), 2)
    assert abs(planned - real) / real < 0.1, (planned, real)

    _mount_tmpfs(small_fs, "64m", remount=True)  # space is back
    again = orchestrate("train", f"run.dir={run_dir}", *COMMON, *override)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 4" in again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, 9))
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

    (small_fs / "fill").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        rundir._WARNED.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            assert not rundir.write_state(run_dir, "failed", step=6)
        assert "Read-only file system" in caplog.records[0].getMessage()
        assert rundir.read_state(run_dir)["step"] == 3
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
