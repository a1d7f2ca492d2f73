"""Graceful stop: a preemption warning, a time limit, Ctrl-C, SIGTERM or a user request becomes
"checkpoint at the next step boundary and exit cleanly"; and the time-based checkpoint clock.

Ways in, so it works under any launcher:
- the file ``run_dir/STOP``: what the Slurm batch script writes on Slurm's USR1 warning, what
  the local launcher writes on Ctrl-C/SIGTERM (its content names the signal), what users
  ``touch``;
- SIGUSR1, SIGINT, SIGTERM and SIGHUP to a rank (torchrun forwards the signals it gets; `scancel`
  sends SIGTERM to every process of the job).

Ranks agree through one tiny all-reduce per step, so they all checkpoint the same step. It
carries the highest stop reason seen on any rank and rank 0's verdict on the checkpoint clock
(one clock decides, so ranks never disagree about a time-based save).

SIGTERM is also how torchrun tears down a group after a real failure. A rank that gets it after
a rank on its node has exited exits at once. A rank of a failed group elsewhere cannot agree on
anything: its next collective fails (gloo at once, NCCL at its timeout), and a watchdog ends a
rank that is stuck outside any collective when no step boundary comes within
``max(10 s, 3 x the slowest step so far)`` of the signal; torchrun's own SIGKILL after its
``--shutdown-timeout`` (30 s) is the last resort. A second Ctrl-C (SIGINT more than a second
after the first; torchrun's forwarded copy arrives within milliseconds) exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

STOP_FILE = "STOP"
# Stop reasons by rank in the all-reduce (MAX wins): the exit code the launcher reports.
REASONS = {1: ("STOP file", 0), 2: ("SIGUSR1", 0), 3: ("SIGHUP", 129), 4: ("SIGTERM", 143),
           5: ("SIGINT", 130)}
_CODE = {name: code for code, (name, _) in REASONS.items()}
GRACE_FLOOR_S = 10.0


class _Signals:
    """What this process has received (module state: handlers are per process)."""

    def __init__(self) -> None:
        self.code = 0
        self.first = 0.0
        self.boundary = threading.Event()  # set once the ranks agreed to stop
        self.last_step_s = 0.0  # the slowest step interval so far (the watchdog's yardstick)


_SIG = _Signals()


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    now = time.monotonic()
    if _SIG.code and signum == signal.SIGINT and now - _SIG.first > 1.0:
        print(f"rank {os.environ.get('RANK', 0)}: second SIGINT: exiting at once, without a "
              "checkpoint", file=sys.stderr, flush=True)
        os._exit(130)
    if _SIG.code:
        return
    if signum == signal.SIGTERM and _local_group_broken():
        print(f"rank {os.environ.get('RANK', 0)}: SIGTERM after a rank on this node exited: the "
              "group is being torn down; exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(143)
    _SIG.code, _SIG.first = _CODE[name], now
    if signum != signal.SIGUSR1:  # USR1 is Slurm's warning: there is time, no watchdog
        threading.Thread(target=_watchdog, args=(name, REASONS[_CODE[name]][1]), daemon=True).start()


def _local_group_broken() -> bool:
    """True when torchrun's SIGTERM is a teardown: one of its ranks on this node is gone
    already (torchrun reaped it). A stop request finds every local rank alive."""
    expected = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)
    if expected < 2 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()
    return sum(parent_pid(e) == parent for e in os.listdir("/proc") if e.isdigit()) < expected


def parent_pid(pid: str) -> int:
    """The parent of process ``pid`` (-1 when it is gone)."""
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _watchdog(name: str, exit_code: int) -> None:
    while True:
        grace = max(GRACE_FLOOR_S, 3 * _SIG.last_step_s)
        left = _SIG.first + grace - time.monotonic()
        if left <= 0:
            break
        if _SIG.boundary.wait(min(left, 1.0)):
            return
    print(f"rank {os.environ.get('RANK', 0)}: {name}, and no step boundary within {grace:.0f} s: "
          "exiting without a checkpoint (is the group being torn down after a failure?)",
          file=sys.stderr, flush=True)
    os._exit(exit_code)


def install_signal_handlers(signals: tuple[signal.Signals, ...] = (
        signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
    """Route stop signals into the agreed stop (call early, from the main thread). A rank
    process takes them all; an in-process run (tests) only USR1, leaving its host's Ctrl-C be."""
    try:
        for sig in signals:
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread
        pass


def file_reason(run_dir: Path) -> Optional[str]:
    """The STOP file's reason (a signal name the launcher wrote, else 'STOP file'), or None."""
    path = Path(run_dir) / STOP_FILE
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if text in _CODE else "STOP file"


class StopRequest:
    """The loop's view at each step boundary: stop now, save now by the clock, and why."""

    def __init__(self, run_dir: Path, device: torch.device, save_every_minutes: float = 0.0):
        self.run_dir = run_dir
        self.device = device
        self.interval_s = 60.0 * save_every_minutes
        self.last_save = self.last_boundary = time.monotonic()
        self.reason = ""
        self.exit_code = 0
        install_signal_handlers((signal.SIGUSR1,))

    def local(self) -> int:
        """This rank's stop reason code (0: none)."""
        reason = file_reason(self.run_dir)
        return max(_SIG.code, _CODE[reason] if reason else 0)

    def at_boundary(self, is_main: bool) -> tuple[bool, bool]:
        """(stop, save now by the clock), the same on every rank (a collective: call on all)."""
        now = time.monotonic()
        _SIG.last_step_s = max(_SIG.last_step_s, now - self.last_boundary)
        self.last_boundary = now
        due = is_main and self.interval_s > 0 and now - self.last_save >= self.interval_s
        flags = torch.tensor([float(self.local()), 1.0 if due else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        code, due_all = int(flags[0].item()), bool(flags[1].item())
        if code:
            _SIG.boundary.set()
            self.reason, self.exit_code = REASONS[code]
        return bool(code), due_all

    def saved(self) -> None:
        """A checkpoint was written: the clock counts from here."""
        self.last_save = time.monotonic()
