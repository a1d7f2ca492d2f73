"""Atomic, resumable checkpoints in ``run_dir/checkpoints``.

Layout: ``step-00000100/`` holds the strategy's state (adapter, optimizer, schedule) and
``trainer_state.json``; no RNG state, since each micro-batch seeds its own draws
(``data/batches.draw_seed``); ``latest`` names the newest complete one. A
checkpoint is written under a temporary name and renamed only when every rank has finished
writing, and ``latest`` moves only after that, so a crash mid-write leaves the previous
checkpoint as the one a resume picks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from . import faults
from .distributed import DistInfo, all_gather_object, barrier, broadcast_object, set_phase
from .strategies import Strategy


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def resolve(path: Path) -> Path:
    """A complete checkpoint named by ``path``: a checkpoint directory itself, or a run directory
    (its latest). Raises ValueError naming what is there instead."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path.resolve()
    if (path / "config.yaml").is_file():
        found = latest(path)
        if found is None:
            raise ValueError(f"{path} is a run directory without a complete checkpoint")
        return found.resolve()
    done = sorted(p.name for p in path.parent.glob("step-*") if (p / "trainer_state.json").exists())
    hint = f"; complete checkpoints beside it: {', '.join(done)}" if done else ""
    if not path.exists():
        raise ValueError(f"{path} does not exist{hint}")
    raise ValueError(f"{path} is neither a complete checkpoint (no trainer_state.json) nor a run "
                     f"directory (no config.yaml){hint}")


def run_of(checkpoint_dir: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step-N``)."""
    return Path(checkpoint_dir).parent.parent


def save(
    run_dir: Path, step: int, strategy: Strategy, dist: DistInfo, trainer_state: dict[str, Any],
    keep_last_n: int,
) -> Path:
    """Write a checkpoint for ``step`` from every rank; returns its final path.

    Each phase ends with every rank learning whether any rank failed (in place of a barrier),
    so a failed write (full disk, I/O error, permissions) stops all ranks together with
    CheckpointWriteError, after the partial directory is removed, instead of one rank dying
    while the others wait in the next collective.
    """
    set_phase(f"checkpoint save at step {step}")
    root = checkpoints_dir(run_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    what = f"checkpoint at step {step}"
    with _agreed(run_dir, what, tmp, dist):
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    with _agreed(run_dir, what, tmp, dist):
        strategy.save_state(tmp)
        if faults.armed("checkpoint_write", step, dist.rank):
            faults.die()  # killed mid-write: the partial .tmp dir must never be resumed from
    with _agreed(run_dir, what, tmp, dist):
        if dist.is_main:
            # The step last: a resumed run's state still holds the step it was loaded at.
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / "latest", name)
            _rotate(root, keep_last_n)
    return final


def export_adapter(run_dir: Path, strategy: Strategy, dist: DistInfo, step: int) -> Path:
    """The final PEFT adapter in ``run_dir/adapter``, with the same agreement as ``save``: a
    failed write removes the partial adapter and stops every rank with CheckpointWriteError."""
    out = run_dir / "adapter"
    with _agreed(run_dir, f"adapter after step {step}", out, dist):
        strategy.save_adapter(out)
    return out


class CheckpointWriteError(RuntimeError):
    """A checkpoint or the adapter could not be written; raised on every rank at once. The
    message is one line: the step, the path, the cause and the checkpoint a restart resumes from;
    ``reason`` is its short form for state.json and ``orchestrate status``."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


#: How the storage errors a shared filesystem gives are called in a status line.
_KINDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "file system read-only", errno.EIO: "I/O error", errno.EACCES: "permission denied"}


# torch.save's zip writer reports a short write (a full disk) as a RuntimeError of its own.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _storage_error(err: BaseException, where: Path) -> Optional[OSError]:
    if isinstance(err, OSError):
        return err
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, RuntimeError) and any(m in text for m in _TORCH_SHORT_WRITE):
        try:  # a short write on a full filesystem is the usual cause; say which it was
            full = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free < 16 * 2**20
        except (OSError, StopIteration):
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        return OSError(errno.EIO, f"short write ({text[-60:].strip()})", str(where))
    return None


def _write_failure(exc: BaseException, where: Path) -> Optional[OSError]:
    """The storage error behind ``exc``: raised directly, or collected by
    torch.distributed.checkpoint from whichever rank hit it (CheckpointException carries each
    rank's exception)."""
    direct = _storage_error(exc, where)
    if direct is not None:
        return direct
    for err, _trace in getattr(exc, "failures", {}).values():
        found = _storage_error(err, where)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _agreed(run_dir: Path, what: str, partial: Path, dist: DistInfo) -> Iterator[None]:
    """Run a write phase on every rank, then agree (one small all-gather) whether it worked.

    A rank whose own error is not an OSError (a bug, not the storage) re-raises it after the
    agreement, so its traceback is printed and no other rank hangs waiting for it.
    """
    error: Optional[BaseException] = None
    try:
        yield
    except BaseException as exc:  # noqa: B036 - CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = exc
    failure = _write_failure(error, partial) if error is not None else None
    mine = None if error is None else (
        f"{failure.strerror or failure} ({failure.filename or partial})" if failure is not None
        else f"{type(error).__name__}: {error}".splitlines()[0])
    code = failure.errno if failure is not None else None
    reports = [r for r in all_gather_object(None if mine is None else (failure is not None, mine, code))
               if r is not None]
    if not reports:
        return
    if dist.is_main:  # a partial directory is never resumed from; removing it frees its space
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):  # EROFS even when it is not there
            (checkpoints_dir(run_dir) / "latest.tmp").unlink(missing_ok=True)
    barrier()
    if error is not None and failure is None:
        raise error
    cause, code = next(((text, c) for storage, text, c in reports if storage), reports[0][1:])
    done = latest(run_dir)
    resume_step = int(done.name.split("-")[1]) if done is not None else 0
    resume = (f"the last complete checkpoint is {done.name} ({done}); started again with "
              f"run.dir={run_dir} the run resumes from step {resume_step}"
              if done is not None else
              f"there is no complete checkpoint yet; started again with run.dir={run_dir} the run "
              "begins at step 0")
    raise CheckpointWriteError(
        f"{what} could not be written: {cause}; training stopped and the partial {partial.name} was "
        f"removed; {resume}",
        reason=f"{_KINDS.get(code, 'write failed')}: {what} not written; resumable from step {resume_step}")


def _rotate(root: Path, keep_last_n: int) -> None:
    if keep_last_n <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    for old in done[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, strategy: Strategy, everything: bool = True) -> dict[str, Any]:
    """Restore strategy state; returns the trainer state. With ``everything=False`` (a fork
    that keeps only the adapter) the adapter weights alone: the optimizer and schedule stay as a
    fresh run has them."""
    strategy.load_state(path, optimizer=everything)
    state = json.loads((path / "trainer_state.json").read_text())
    return broadcast_object(state)
