"""Fault injection for the reliability tests, driven by ``ORCHESTRATOR_TEST_FAULT``.

The variable is honoured only when it is set, which no real run does: ``kind:step[:rank]``,
e.g. ``checkpoint_write:4`` (die halfway through writing the step-4 checkpoint) or
``nan_loss:3`` (poison the loss of step 3); several are comma-separated. Keeping the hooks
here, named, makes it obvious where a test can reach into the loop and that nothing else can.
"""

from __future__ import annotations

import os

ENV = "ORCHESTRATOR_TEST_FAULT"


def armed(kind: str, step: int, rank: int = 0) -> bool:
    """True where the test asked for ``kind`` at ``step`` (on ``rank``). Faults fire in the
    first attempt only: a group torchrun restarted after the fault runs clean."""
    specs = os.environ.get(ENV)
    if not specs or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    for spec in specs.split(","):  # several faults: "wait:4:1,hang:6:1"
        parts = spec.split(":")
        if parts[0] == kind and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
            return True
    return False


def pause(kind: str, rank: int) -> None:
    """``kind:SECONDS[:RANK]``: sleep that long here (first attempt only), e.g. ``slow_load:10:0``
    makes rank 0's loading outlast a short ``launcher.dist_timeout_s``."""
    import time

    specs = os.environ.get(ENV)
    if not specs or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    for spec in specs.split(","):
        parts = spec.split(":")
        if parts[0] == kind and (len(parts) < 3 or int(parts[2]) == rank):
            time.sleep(float(parts[1]))


def die() -> None:
    """Vanish like a killed process: no cleanup, no exception handlers."""
    os._exit(137)


PACE_ENV = "ORCHESTRATOR_TEST_STEP_SECONDS"
RELEASE_FILE = "CONTINUE"
WAITING_FILE = "WAITING"  # there while a rank waits for RELEASE_FILE
# Where WAITING and CONTINUE live (default: the run directory); a test that remounts the run's
# filesystem read-only while a rank waits needs them elsewhere.
SIGNAL_DIR_ENV = "ORCHESTRATOR_TEST_SIGNAL_DIR"


def at_step_start(step: int, rank: int, run_dir) -> None:
    """Test hooks at a step's start, so a test can signal a run at a known step on a machine of
    any speed: ``$ORCHESTRATOR_TEST_STEP_SECONDS`` makes every step that much longer, and
    ``wait:STEP[:RANK]`` holds the rank there until the test creates ``RUN_DIR/CONTINUE``, and
    ``hang:STEP[:RANK]`` for good (``RUN_DIR/WAITING`` says a rank is held)."""
    import time
    from pathlib import Path

    run_dir = Path(os.environ.get(SIGNAL_DIR_ENV) or run_dir)

    seconds = float(os.environ.get(PACE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)
    if armed("hang", step, rank):  # a rank stuck outside any collective
        (run_dir / WAITING_FILE).write_text(f"{step}\n")
        time.sleep(3600)
    if armed("wait", step, rank):
        release, waiting = run_dir / RELEASE_FILE, run_dir / WAITING_FILE
        waiting.write_text(f"{step}\n")
        while not release.exists():
            time.sleep(0.05)
        waiting.unlink()
        release.unlink()
