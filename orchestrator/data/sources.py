"""Rows from local files, each with the place it came from (``file:line`` or ``file: row N``).

JSON and JSONL are parsed here, line by line, so a bad line can be named exactly and, under
``data.on_bad_row=skip``, skipped alone; Parquet and CSV go through Hugging Face ``datasets``
(local files only), which reads them as Arrow tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset problem, naming the file, the line and the reason."""


@dataclass
class Rows:
    """Rows that parsed, and what was skipped (``where: reason``), in file order."""

    rows: list[tuple[str, dict]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def data_files(path: str) -> list[Path]:
    """The file itself, or the supported files of a directory of shards (sorted, one kind)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this directory")
        kinds = {_kind(f) for f in files}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixes {' and '.join(sorted(kinds))} shards; use one format")
        return files
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of: {', '.join(SUFFIXES)}")
    return [p]


def _kind(p: Path) -> str:
    return "json" if p.suffix in (".json", ".jsonl") else p.suffix[1:]


def read_rows(path: str, on_bad_row: str = "error", cache_dir: Optional[str] = None) -> Rows:
    """Every row of ``path`` (file or shard directory); a bad row raises unless skipping."""
    out = Rows()
    for f in data_files(path):
        reader = _read_json if _kind(f) == "json" else _read_table
        reader(f, out, on_bad_row, cache_dir)
    if not out.rows:
        why = f" ({len(out.skipped)} bad rows skipped, first: {out.skipped[0]})" if out.skipped else ""
        raise DataError(f"{path}: no rows{why}")
    return out


def bad_row(out: Rows, on_bad_row: str, message: str) -> None:
    """Raise ``message`` or record it as skipped."""
    if on_bad_row != "skip":
        raise DataError(message)
    out.skipped.append(message)


def _read_json(f: Path, out: Rows, on_bad_row: str, cache_dir: Optional[str]) -> None:
    text = f.read_text(encoding="utf-8")
    if f.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, row in enumerate(items, start=1):
            _add(out, f"{f}: row {i}", row, on_bad_row)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad_row(out, on_bad_row, f"{f}:{lineno}: invalid JSON ({e.msg})")
            continue
        _add(out, f"{f}:{lineno}", row, on_bad_row)


def _add(out: Rows, where: str, row, on_bad_row: str) -> None:
    if not isinstance(row, dict):
        bad_row(out, on_bad_row, f"{where}: expected a JSON object, got {type(row).__name__}")
        return
    out.rows.append((where, row))


def _read_table(f: Path, out: Rows, on_bad_row: str, cache_dir: Optional[str]) -> None:
    """Parquet or CSV through ``datasets``; CSV cells stay strings (``"12"`` is an answer, not an int)."""
    import datasets

    kwargs: dict = {}
    if f.suffix == ".csv":
        import csv

        with f.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise DataError(f"{f}: no rows")
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "na_filter": False}
    try:
        ds = datasets.load_dataset(_kind(f), data_files=[str(f)], split="train",
                                   cache_dir=str(Path(cache_dir) / "hf") if cache_dir else None, **kwargs)
    except Exception as exc:  # pyarrow/pandas raise many types for unreadable files
        raise DataError(f"{f}: cannot be read as {_kind(f)} ({str(exc).splitlines()[0]})") from None
    for i, row in enumerate(ds, start=1):
        out.rows.append((f"{f}: row {i}", row))
