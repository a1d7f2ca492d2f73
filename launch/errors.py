"""The launcher's one kind of user-facing error, and how an exception becomes its one line."""

from __future__ import annotations


class UsageError(Exception):
    """A user-fixable problem, printed as one line with exit code 2."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if len(text) > 1 and text[0].endswith(" raised while composing config:"):
        # A bad key inside a preset: "In 'model/x': <Type> raised ...:" + the detail below it.
        return text[0].rsplit(":", 2)[0] + ": " + text[1].strip()
    return text[0] if text else type(exc).__name__
