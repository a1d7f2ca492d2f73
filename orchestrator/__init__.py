"""Distributed QLoRA fine-tuning: config, model, strategies, data, loop, checkpoints, exports."""

# The one place the version is written: pyproject.toml reads it from here (setuptools' attr:),
# and runs record it, so a run made from an installed wheel still names its code.
__version__ = "0.1.0"
