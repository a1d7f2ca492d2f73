"""What every part of the configuration shares: its error type and the ``auto`` value."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that is wrong; the message names the key, the value and what is allowed."""


AUTO = "auto"


def is_auto(value: Any) -> bool:
    """A setting left to the planner (trainer.micro_batch_size, model.gradient_checkpointing)."""
    return isinstance(value, str) and value == AUTO
