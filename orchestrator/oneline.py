"""An exception as one line, for warnings and errors that must stay one line.

The first line alone is often useless: pydantic says "1 validation error for Settings" and puts
the field on the next line; wandb's CommError puts the cause ("connection refused") on a
"while retrying" line.
"""

from __future__ import annotations


def brief(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, the message's lines joined with `` | ``, cut at ``limit`` characters."""
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
