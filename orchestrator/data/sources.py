"""Rows from local files or Hugging Face datasets, each with the place it came from
(``file:line``, ``file: row N``, ``org/name[split]: row N``).

JSON and JSONL are parsed here, line by line, so a bad line can be named exactly and, under
``data.on_bad_row=skip``, skipped alone; Parquet and CSV are read as Arrow record batches. A
Hugging Face dataset (a ``save_to_disk`` directory, or a repository id where no local path has
that name) is opened through ``datasets`` itself, so its cache, offline mode and login work
as everywhere else, and read from its memory-mapped Arrow table in batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

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


@dataclass
class Chunk:
    """A run of consecutive rows of one file that a worker reads, formats and tokenizes alone.

    JSONL chunks are byte ranges the worker reads itself; rows of other files travel in the
    chunk (``rows``: a list of dicts or an Arrow record batch)."""

    file: str
    first: int  # line number (JSONL) or row number of the first row, from 1
    ordinal: int  # the first row's index among all rows of the source, for the eval split
    count: int  # rows (non-blank lines) in the chunk
    start: int = 0
    end: int = 0
    rows: object = None


def split_sources(cfg) -> list[tuple[str, str, str, str]]:
    """(split, setting, path, dataset split) of the training and eval rows: the eval rows come
    from data.eval_path, or from data.eval_split of data.path's dataset."""
    out = [("train", "path", cfg.path, cfg.split)]
    if cfg.eval_path:
        out.append(("eval", "eval_path", cfg.eval_path, cfg.eval_split or cfg.split))
    elif cfg.eval_split:
        out.append(("eval", "eval_split", cfg.path, cfg.eval_split))
    return out


def _is_saved(p: Path) -> bool:
    """A directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def is_local(path: str) -> bool:
    """Read as local files (data_files says what is wrong with them), not as a dataset: a file,
    a directory of shards, or a name no repository id can be; a saved dataset, and a directory
    in a dataset repository's layout (files under data/, a README's config), are datasets."""
    p = Path(path).expanduser()
    if p.is_dir():
        return not _is_saved(p) and any(f.is_file() and f.suffix in SUFFIXES for f in p.iterdir())
    return p.exists() or p.suffix in SUFFIXES or path.startswith(("/", ".", "~")) or path.count("/") > 1


def hub_dataset(path: str, split: str, cfg) -> Any:
    """The ``datasets.Dataset`` a save_to_disk directory or a repository id names (one split).
    Opened once per process (preparation asks three times); a directory saved again since is
    opened again."""
    p = Path(path).expanduser()
    saved = [f for f in (p / "state.json", p / "dataset_dict.json") if f.is_file()] if p.is_dir() else []
    return _open_dataset(path, split, cfg.config_name, cfg.revision,
                         tuple(cfg.data_files) if cfg.data_files else None,
                         saved[0].stat().st_mtime_ns if saved else None)


@lru_cache(maxsize=8)
def _open_dataset(path: str, split: str, config_name: Optional[str], revision: Optional[str],
                  files: Optional[tuple[str, ...]], saved_at: Optional[int]) -> Any:
    import datasets

    p = Path(path).expanduser()
    if _is_saved(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: the saved dataset has no split {split!r} (it has {', '.join(ds)})")
            ds = ds[split]
        return ds

    def load(source: str, rev: Optional[str]) -> Any:
        return datasets.load_dataset(source, name=config_name, split=split, revision=rev,
                                     data_files=list(files) if files else None)

    try:
        return load(path, revision)
    except Exception as exc:  # datasets and huggingface_hub raise many kinds for one cause
        error = exc
    # Offline, datasets only finds what it prepared itself before; a repository downloaded into
    # the Hub cache (huggingface-cli download --repo-type dataset) is read from its snapshot.
    import huggingface_hub
    import huggingface_hub.constants as hub

    try:
        snapshot = huggingface_hub.snapshot_download(path, repo_type="dataset", revision=revision,
                                                     local_files_only=True)
    except Exception:
        snapshot = None
    if snapshot is not None:
        try:
            return load(snapshot, None)
        except Exception as exc:
            error = exc
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    why = (f"no Hugging Face dataset of that name is in the cache at HF_HOME={hub.HF_HOME} and the Hub "
           "is off (HF_HUB_OFFLINE=1)" if hub.HF_HUB_OFFLINE else
           f"the Hugging Face dataset of that name could not be loaded ({type(error).__name__}: {first})")
    raise DataError(f"{path}: no such local file or directory, and {why}")


class Source:
    """The rows of a file, a shard directory or a Hugging Face dataset's split, counted up front
    (the progress bar's total and the eval split need the count) and handed out in chunks
    without holding them all."""

    def __init__(self, path: str, chunk_rows: int = 1000, split: str = "train", cfg=None) -> None:
        self.chunk_rows = chunk_rows
        self._jsonl: dict[Path, list[Chunk]] = {}
        self._arrays: dict[Path, list] = {}
        self.dataset = None if cfg is None or is_local(path) else hub_dataset(path, split, cfg)
        if self.dataset is not None:
            self.files: list[Path] = []
            self.label = f"{path}[{split}]"
            self.total = len(self.dataset)
            return
        self.files = data_files(path)
        self.total = 0
        for f in self.files:
            if _kind(f) == "json" and not _is_array(f):
                self._jsonl[f] = _plan_lines(f, self.total, chunk_rows)
                self.total += sum(c.count for c in self._jsonl[f])
            elif _kind(f) == "json":
                self._arrays[f] = _read_array(f)
                self.total += len(self._arrays[f])
            else:
                self.total += _count_table(f)

    def chunks(self):
        ordinal = 0
        if self.dataset is not None:
            for batch in self.dataset.with_format("arrow").iter(batch_size=self.chunk_rows):
                yield Chunk(self.label, ordinal + 1, ordinal, len(batch), rows=batch)
                ordinal += len(batch)
            return
        for f in self.files:
            if f in self._jsonl:
                yield from self._jsonl[f]
                ordinal += sum(c.count for c in self._jsonl[f])
                continue
            batches = ([self._arrays.pop(f)] if f in self._arrays else _table_batches(f, self.chunk_rows))
            row = 1
            for batch in batches:
                for lo in range(0, len(batch), self.chunk_rows):
                    part = batch[lo: lo + self.chunk_rows]
                    yield Chunk(str(f), row, ordinal, len(part), rows=part)
                    row, ordinal = row + len(part), ordinal + len(part)


def _is_array(f: Path) -> bool:
    if f.suffix != ".json":
        return False
    with f.open("rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _plan_lines(f: Path, ordinal: int, chunk_rows: int) -> list[Chunk]:
    """Byte ranges of ``chunk_rows`` non-blank lines each (one pass, no line kept)."""
    chunks: list[Chunk] = []
    start = pos = 0
    first, count = 1, 0
    with f.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if count == 0:
                start, first = pos, lineno
            pos += len(line)
            if line.strip():
                count += 1
                if count == chunk_rows:
                    chunks.append(Chunk(str(f), first, ordinal, count, start, pos))
                    ordinal, count = ordinal + count, 0
    if count:
        chunks.append(Chunk(str(f), first, ordinal, count, start, pos))
    return chunks


def _read_array(f: Path) -> list:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None


def _csv_options(f: Path):
    """CSV cells stay strings (``"12"`` is an answer, not an int); empty cells are ``""``."""
    import csv

    from pyarrow import csv as pacsv
    import pyarrow as pa

    with f.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataError(f"{f}: no rows")
    return dict(parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                     strings_can_be_null=False))


def _table_batches(f: Path, chunk_rows: int):
    """Record batches of a Parquet or CSV file, read as a stream."""
    try:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(f).iter_batches(batch_size=chunk_rows)
        else:
            from pyarrow import csv as pacsv

            yield from pacsv.open_csv(f, **_csv_options(f))
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise DataError(f"{f}: cannot be read as {_kind(f)} ({str(exc).splitlines()[0]})") from None


def _count_table(f: Path) -> int:
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(f).metadata.num_rows
        except Exception as exc:
            raise DataError(f"{f}: cannot be read as parquet ({str(exc).splitlines()[0]})") from None
    return sum(len(b) for b in _table_batches(f, 1 << 16))


def chunk_rows(chunk: Chunk):
    """(where, row) of every row of the chunk; a row that is not an object comes as a DataError."""
    f = Path(chunk.file)
    if chunk.rows is None:
        with f.open("rb") as fh:
            fh.seek(chunk.start)
            data = fh.read(chunk.end - chunk.start)
        for lineno, line in enumerate(data.split(b"\n"), start=chunk.first):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield f"{f}:{lineno}", DataError(f"{f}:{lineno}: invalid JSON ({getattr(e, 'msg', e)})")
                continue
            yield f"{f}:{lineno}", _object(row, f"{f}:{lineno}")
        return
    rows = chunk.rows if isinstance(chunk.rows, list) else chunk.rows.to_pylist()
    for i, row in enumerate(rows, start=chunk.first):
        yield f"{f}: row {i}", _object(row, f"{f}: row {i}")


def _object(row, where: str):
    if not isinstance(row, dict):
        return DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_rows(path: str, on_bad_row: str = "error", cache_dir: Optional[str] = None) -> Rows:
    """Every row of ``path`` (file or shard directory); a bad row raises unless skipping."""
    out = Rows()
    for chunk in Source(path).chunks():
        for where, row in chunk_rows(chunk):
            if isinstance(row, DataError):
                bad_row(out, on_bad_row, str(row))
            else:
                out.rows.append((where, row))
    if not out.rows:
        why = f" ({len(out.skipped)} bad rows skipped, first: {out.skipped[0]})" if out.skipped else ""
        raise DataError(f"{path}: no rows{why}")
    return out


def bad_row(out: Rows, on_bad_row: str, message: str) -> None:
    """Raise ``message`` or record it as skipped."""
    if on_bad_row != "skip":
        raise DataError(message)
    out.skipped.append(message)
