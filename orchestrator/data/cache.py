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
from typing import Iterator, Optional, Sequence

from ..config import DataConfig
from .sources import data_files
from .tokenize import Example

VERSION = 1  # bump when the tokenized layout or the tokenization rules change
# Settings that do not change the tokens of any example.
_NOT_TOKENS = ("path", "eval_path", "cache_dir", "packing")


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
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        vocab = json.dumps(state, sort_keys=True)
    else:
        vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    parts = [type(tokenizer).__name__, vocab, json.dumps(special), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def fingerprint(cfg: DataConfig, tokenizer) -> str:
    files = {
        key: [[f.name, _file_digest(f)] for f in data_files(getattr(cfg, key))]
        for key in ("path", "eval_path") if getattr(cfg, key)
    }
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_TOKENS}
    key = {"version": VERSION, "files": files, "tokenizer": _tokenizer_digest(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class ExampleSet(Sequence[Example]):
    """Examples read lazily from an Arrow table on disk (memory-mapped, shared by the ranks)."""

    def __init__(self, table) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Example(**self._table[int(i)])

    def __iter__(self) -> Iterator[Example]:
        for row in self._table:
            yield Example(**row)


def _save_split(examples: list[Example], path: Path) -> None:
    from datasets import Dataset

    if not examples:  # datasets cannot reload a table without rows; no directory means empty
        return
    columns = {f.name: [getattr(e, f.name) for e in examples] for f in dataclasses.fields(Example)}
    Dataset.from_dict(columns).save_to_disk(str(path))


def _load_split(path: Path) -> Sequence[Example]:
    from datasets import load_from_disk

    if not path.exists():
        return []
    return ExampleSet(load_from_disk(str(path)))


def lookup(entry: Path) -> Optional[tuple[Sequence[Example], Sequence[Example], dict]]:
    """(train, eval, stats) of a complete entry, or None."""
    meta = entry / "meta.json"
    if not meta.exists():
        return None
    return _load_split(entry / "train"), _load_split(entry / "eval"), json.loads(meta.read_text())


def store(entry: Path, train: list[Example], eval_: list[Example], stats: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_split(train, tmp / "train")
        _save_split(eval_, tmp / "eval")
        (tmp / "meta.json").write_text(json.dumps(stats, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # not a racing writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
