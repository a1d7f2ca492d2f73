"""Fault injection for the reliability tests, driven by ``ORCHESTRATOR_TEST_FAULT``.

The variable is honoured only when it is set, which no real run does: ``kind:step[:rank]``,
e.g. ``checkpoint_write:4`` (die halfway through writing the step-4 checkpoint) or
``nan_loss:3`` (poison the loss of step 3). Keeping the hooks here, named, makes it obvious
where a test can reach into the loop and that nothing else can.
"""

from __future__ import annotations

import os

ENV = "ORCHESTRATOR_TEST_FAULT"


def armed(kind: str, step: int, rank: int = 0) -> bool:
    """True where the test asked for ``kind`` at ``step`` (on ``rank``). Faults fire in the
    first attempt only: a group torchrun restarted after the fault runs clean."""
    spec = os.environ.get(ENV)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    parts = spec.split(":")
    if parts[0] != kind or int(parts[1]) != step:
        return False
    return len(parts) < 3 or int(parts[2]) == rank


def die() -> None:
    """Vanish like a killed process: no cleanup, no exception handlers."""
    os._exit(137)


PACE_ENV = "ORCHESTRATOR_TEST_STEP_SECONDS"


def pace() -> None:
    """Make each step last at least ``$ORCHESTRATOR_TEST_STEP_SECONDS`` longer, so a test that
    signals a run lands mid-training on a fast machine too."""
    seconds = float(os.environ.get(PACE_ENV) or 0)
    if seconds > 0:
        import time

        time.sleep(seconds)
