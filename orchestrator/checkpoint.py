"""Atomic, resumable checkpoints in ``run_dir/checkpoints``.

Layout: ``step-00000100/`` holds the strategy's state (adapter, optimizer, schedule), one RNG
file per rank and ``trainer_state.json``; ``latest`` names the newest complete one. A
checkpoint is written under a temporary name and renamed only when every rank has finished
writing, and ``latest`` moves only after that, so a crash mid-write leaves the previous
checkpoint as the one a resume picks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from . import faults
from .distributed import DistInfo, barrier, broadcast_object, set_phase
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


def save(
    run_dir: Path, step: int, strategy: Strategy, dist: DistInfo, trainer_state: dict[str, Any],
    keep_last_n: int,
) -> Path:
    """Write a checkpoint for ``step`` from every rank; returns its final path."""
    set_phase(f"checkpoint save at step {step}")
    root = checkpoints_dir(run_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    strategy.save_state(tmp)
    if faults.armed("checkpoint_write", step, dist.rank):
        faults.die()  # killed mid-write: the partial .tmp dir must never be resumed from
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(dist.device)
    torch.save(rng, tmp / f"rng-rank{dist.rank}.pt")
    barrier()
    if dist.is_main:
        # The step last: a resumed run's state still holds the step it was loaded at.
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name)
        _rotate(root, keep_last_n)
    barrier()
    return final


def _rotate(root: Path, keep_last_n: int) -> None:
    if keep_last_n <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    for old in done[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, strategy: Strategy, dist: DistInfo) -> dict[str, Any]:
    """Restore strategy state and this rank's RNG; returns the trainer state."""
    strategy.load_state(path)
    rng_file = path / f"rng-rank{dist.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], dist.device)
    state = json.loads((path / "trainer_state.json").read_text())
    return broadcast_object(state)
