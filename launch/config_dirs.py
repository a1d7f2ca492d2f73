"""Users' own config trees beside ours: ``--config-dir DIR`` and the files found there.

A team keeps presets for its cluster (``model/``, ``data/``, ``launcher/`` ...) in its own
repository. Hydra's way to use them is a config search path: ``--config-dir DIR`` is short for
``hydra.searchpath=[file://DIR]``, which joins DIR to the search path *after* ours, exactly as
Hydra's own ``--config-dir`` does. So a user's directory adds options and can extend ours
(``defaults: [tiny, _self_]``); a name that exists in both is ours.

The flag becomes an ordinary override before anything composes, so it is recorded in the run
directory's ``overrides.yaml`` and each sweep trial composes with it like any other override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

FLAG = "--config-dir"
SEARCHPATH = "hydra.searchpath"


class ConfigDirError(ValueError):
    """A ``--config-dir`` that cannot be used; the message names it."""


def _quote(text: str) -> str:
    """A Hydra override string literal (the grammar's single-quoted form)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _searchpath_value(override: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        value = OverridesParser.create().parse_override(override).value()
    except OverrideParseException as exc:
        raise ConfigDirError(str(exc).strip().splitlines()[0]) from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigDirError(f"{override}: {SEARCHPATH} must be a list of paths, e.g. "
                             f"{SEARCHPATH}=[file://./conf]")
    return value


def expand(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config-dir DIR`` (or ``--config-dir=DIR``) folded into one
    ``hydra.searchpath`` override (appended to one the user gave)."""
    rest: list[str] = []
    dirs: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == FLAG or arg.startswith(FLAG + "="):
            if arg == FLAG:
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise ConfigDirError(f"{FLAG} takes a directory: {FLAG} DIR")
                value, i = args[i + 1], i + 2
            else:
                value, i = arg.split("=", 1)[1], i + 1
            path = Path(value).expanduser().resolve()
            if not path.is_dir():
                raise ConfigDirError(f"{FLAG} {value}: no such directory ({path})")
            dirs.append(f"file://{path}")
            continue
        rest.append(arg)
        i += 1
    if not dirs:
        return rest
    given = [a for a in rest if a.split("=", 1)[0] == SEARCHPATH]
    entries = [*(_searchpath_value(given[-1]) if given else []), *dirs]
    rest = [a for a in rest if a.split("=", 1)[0] != SEARCHPATH]
    return [f"{SEARCHPATH}=[{','.join(_quote(e) for e in entries)}]", *rest]


def search_dirs(overrides: Sequence[str]) -> list[Path]:
    """Local directories on the config search path the overrides add (``file://`` entries;
    ``pkg://`` entries have no directory of their own to look in)."""
    found: list[Path] = []
    for override in overrides:
        if override.split("=", 1)[0] != SEARCHPATH:
            continue
        for entry in _searchpath_value(override):
            if entry.startswith("file://"):
                found.append(Path(entry[len("file://"):]).expanduser())
    return found
