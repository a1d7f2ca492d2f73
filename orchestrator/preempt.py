"""Graceful stop: a preemption warning, a time limit or a user request becomes "checkpoint at
the next step boundary and exit cleanly".

Two ways in, so it works under any launcher: SIGUSR1 to the rank (SIGTERM stays fatal: it is
how torchrun tears a failed group down) or the
file ``run_dir/STOP`` (what the Slurm batch script writes when Slurm warns it with
``--signal=B:USR1@grace``; users can ``touch`` it too). Ranks agree on the step to stop at
through one tiny all-reduce per step, so they all checkpoint the same step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, run_dir: Path, device: torch.device):
        self.file = run_dir / STOP_FILE
        self.device = device
        self.signalled = False
        try:
            signal.signal(signal.SIGUSR1, self._handler)
        except ValueError:  # not the main thread (in-process tests)
            pass

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or self.file.exists()

    def agreed(self) -> bool:
        """True on every rank if any rank saw a stop request (a collective: call on all)."""
        flag = torch.tensor([1.0 if self.local() else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
