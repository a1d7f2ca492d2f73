"""The tokenized-data cache: tokenize once, read it from every rank and every later run.

An entry is keyed by a sha256 over the data files' bytes, the tokenizer (vocabulary, special
tokens, chat template) and every data setting that changes tokens, so editing any of them makes
a new entry and nothing stale is ever read. Entries are written under a temporary name and
renamed into place, so a reader sees a complete entry or none, and two writers racing (ranks on
nodes that do not share the cache directory) cannot corrupt one.

The default location is a per-user cache (``$QLORA_ORCHESTRATOR_CACHE`` or
``~/.cache/qlora-orchestrator/data``), not the run directory, so reruns, resumes and sweep
trials over the same data share one entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from ..config import DataConfig
from .sources import data_files, hub_dataset, is_local, split_sources
from .tokenize import Example

if TYPE_CHECKING:
    import numpy as np

VERSION = 2  # bump when the tokenized layout or the tokenization rules change
# Settings that do not change the tokens of any example.
_NOT_TOKENS = ("path", "eval_path", "cache_dir", "packing", "packing_scope", "num_proc")


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    env = os.environ.get("QLORA_ORCHESTRATOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qlora-orchestrator" / "data"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation settings change on every call; they do not change the tokens.
        # The serialization is ordered (vocabulary by id), so its text can be hashed as it is.
        backend.no_padding()
        backend.no_truncation()
        vocab = backend.to_str()
    else:
        vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    parts = [type(tokenizer).__name__, vocab, json.dumps(special), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _source_digest(path: str, split: str, cfg: DataConfig) -> list:
    """What identifies a source's rows: each file's bytes, or a Hugging Face dataset's own
    fingerprint (its revision's files, or a saved dataset's state) and split."""
    if is_local(path):
        return [[f.name, _file_digest(f)] for f in data_files(path)]
    return [["dataset", hub_dataset(path, split, cfg)._fingerprint, split]]


def fingerprint(cfg: DataConfig, tokenizer) -> str:
    files = {key: _source_digest(path, split, cfg) for _, key, path, split in split_sources(cfg)}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_TOKENS}
    key = {"version": VERSION, "files": files, "tokenizer": _tokenizer_digest(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


SCHEMA_FIELDS = ("input_ids", "labels", "length", "prompt_len", "target", "prompt")


def schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("input_ids", ids), ("labels", ids), ("length", pa.int32()),
                      ("prompt_len", pa.int32()), ("target", pa.string()), ("prompt", pa.string())])


def record_batch(rows: list[tuple[list[int], list[int], int, str, str]]):
    """Rows (ids, labels, prompt length, target, prompt) as one Arrow batch, built from flat
    lists (much faster than converting a list of lists)."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int32, count=len(rows))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    flat_ids: list[int] = []
    flat_labels: list[int] = []
    for r in rows:
        flat_ids += r[0]
        flat_labels += r[1]
    ids = pa.ListArray.from_arrays(offsets, pa.array(flat_ids, type=pa.int32()))
    labels = pa.ListArray.from_arrays(offsets, pa.array(flat_labels, type=pa.int32()))
    return pa.RecordBatch.from_arrays(
        [ids, labels, pa.array(lengths), pa.array([r[2] for r in rows], type=pa.int32()),
         pa.array([r[3] for r in rows], type=pa.string()), pa.array([r[4] for r in rows], type=pa.string())],
        schema=schema())


class SplitWriter:
    """Appends record batches to one split's Arrow stream file as they come (nothing is held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._writer = None

    def write(self, batch) -> None:
        import pyarrow as pa

        if not len(batch):
            return
        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, schema())
        self._writer.write_batch(batch)
        self.rows += len(batch)

    def close(self) -> None:
        """Finish the stream; the file is closed even when finishing fails (a full disk), so
        the partial entry can be removed and its filesystem unmounted."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            finally:
                self._sink.close()


class ExampleSet(Sequence[Example]):
    """Examples read lazily from an Arrow table on disk (memory-mapped, shared by the ranks)."""

    def __init__(self, table) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _example(self._table[int(i)])

    def __iter__(self) -> Iterator[Example]:
        for row in self._table:
            yield _example(row)

    def lengths(self) -> "np.ndarray":
        """Every example's token count, read from its own column (no token is read)."""
        import numpy as np

        return np.asarray(self._table.data.column("length").to_numpy(), dtype=np.int64)


def example_lengths(examples: Sequence[Example]) -> "np.ndarray":
    """Token count of every example: the cached table's ``length`` column without building an
    Example per row (what the packing sampler and the planner read), else row by row."""
    import numpy as np

    if hasattr(examples, "lengths"):  # ExampleSet, or a mixture of them
        return examples.lengths()
    return np.asarray([len(e.input_ids) for e in examples], dtype=np.int64)


def _example(row: dict) -> Example:
    ids = row["input_ids"]
    return Example(input_ids=ids, labels=row["labels"], prompt_ids=ids[: row["prompt_len"]],
                   target=row["target"], prompt=row["prompt"])


def _load_split(path: Path) -> Sequence[Example]:
    from datasets import Dataset

    if not path.exists():  # no file: a split without rows
        return []
    return ExampleSet(Dataset.from_file(str(path)))


def lookup(entry: Path) -> Optional[tuple[Sequence[Example], Sequence[Example], dict]]:
    """(train, eval, stats) of a complete entry, or None."""
    meta = entry / "meta.json"
    if not meta.exists():
        return None
    return _load_split(entry / "train.arrow"), _load_split(entry / "eval.arrow"), json.loads(meta.read_text())


def new_entry(entry: Path) -> Path:
    """A private directory to write an entry into; ``publish`` renames it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, entry: Path, stats: dict) -> None:
    try:
        (tmp / "meta.json").write_text(json.dumps(stats, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # not a racing writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
