"""Data: read local files, format, tokenize with prompt masking, cache, pack, and hand each rank
its micro-batches.

    sources   local .jsonl/.json/.parquet/.csv files or shard directories -> rows (file:line)
    formats   alpaca / chat / text rows -> (text, trained) segments
    tokenize  segments -> ids and labels (-100 on prompt), truncation policy
    cache     tokenize once; every rank and later run reads the same Arrow entry
    collate   right-padded or packed micro-batches
    budget    token-budget packing of the whole global batch (best-fit decreasing)
    sampler   deterministic per-rank position, checkpointed
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import DataConfig
from .cache import ExampleSet, cache_root, fingerprint, lookup, store
from .budget import TokenBudgetSampler
from .collate import collate, collate_packed, collate_rows, model_inputs, pack_rows
from .formats import check_messages, format_alpaca, format_row
from .sampler import StepSampler, eval_shard
from .sources import DataError, Rows, bad_row, data_files, read_rows
from .tokenize import IGNORE_INDEX, Example, LengthError, tokenize

__all__ = [
    "IGNORE_INDEX", "DataError", "Example", "ExampleSet", "Splits", "StepSampler", "check_rows",
    "TokenBudgetSampler", "collate", "collate_packed", "collate_rows", "eval_shard", "format_alpaca", "load_examples", "load_splits",
    "model_inputs", "pack_rows", "prepare", "read_rows",
]


def _quiet_datasets() -> None:
    """datasets draws progress bars for every save and load; the run's own log says what happened."""
    import datasets

    datasets.disable_progress_bars()


@dataclass
class Splits:
    train: Sequence[Example]
    eval: Sequence[Example]
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)
    cache_hit: bool = False


def _check_row(row: dict, cfg: DataConfig, where: str) -> None:
    if cfg.format == "chat":
        check_messages(row, cfg, where)
    else:
        format_row(row, cfg, where, None)


def check_rows(path: str, cfg: DataConfig) -> int:
    """Parse and format every row without tokenizing, so bad data is refused early."""
    rows = read_rows(path, cfg.on_bad_row, None)
    for where, row in rows.rows:
        _check_row(row, cfg, where)
    return len(rows.rows)


def _tokenized(rows: Rows, tokenizer, cfg: DataConfig) -> tuple[list[Example], dict[str, int]]:
    """Examples of the rows that format and fit; malformed rows raise or are counted as skipped."""
    examples: list[Example] = []
    dropped = truncated = 0
    for where, row in rows.rows:
        try:
            ex, cut = tokenize(format_row(row, cfg, where, tokenizer), tokenizer, cfg, where)
        except LengthError:
            raise
        except DataError as exc:
            bad_row(rows, cfg.on_bad_row, str(exc))
            continue
        if ex is None:
            dropped += 1
            continue
        truncated += cut
        examples.append(ex)
    return examples, {"dropped_too_long": dropped, "truncated": truncated}


def load_examples(path: str, tokenizer, cfg: DataConfig) -> list[Example]:
    """Read and tokenize one file without the cache (tests, small tools)."""
    examples, _ = _tokenized(read_rows(path, cfg.on_bad_row, str(cache_root(cfg))), tokenizer, cfg)
    return examples


def _split_off(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out ``fraction`` of the rows (a seeded choice, file order kept) as the eval split."""
    n = len(rows.rows)
    k = max(1, round(n * fraction))
    if k >= n:
        raise DataError(f"data.eval_fraction={fraction} of {n} rows leaves no training rows")
    held = set(random.Random(seed).sample(range(n), k))
    train = Rows([r for i, r in enumerate(rows.rows) if i not in held], rows.skipped)
    return train, Rows([r for i, r in enumerate(rows.rows) if i in held])


def _read(key: str, cfg: DataConfig) -> Rows:
    try:
        return read_rows(getattr(cfg, key), cfg.on_bad_row, str(cache_root(cfg)))
    except DataError as exc:
        raise DataError(f"data.{key}: {exc}") from None


def _build(cfg: DataConfig, tokenizer) -> tuple[list[Example], list[Example], dict[str, Any]]:
    train_rows = _read("path", cfg)
    eval_rows = _read("eval_path", cfg) if cfg.eval_path else Rows()
    if cfg.eval_fraction > 0:
        train_rows, eval_rows = _split_off(train_rows, cfg.eval_fraction, cfg.split_seed)
    stats: dict[str, Any] = {}
    out = {}
    for name, key, rows in (("train", "path", train_rows), ("eval", "eval_path", eval_rows)):
        try:
            examples, counts = _tokenized(rows, tokenizer, cfg) if rows.rows else ([], {})
        except DataError as exc:
            raise DataError(f"data.{key}: {exc}") from None
        if rows.rows and not examples:
            raise DataError(f"data.{key}: no usable rows ({counts}, {len(rows.skipped)} skipped)")
        out[name] = examples
        stats[name] = {"examples": len(examples), "skipped_rows": len(rows.skipped),
                       "skipped_first": rows.skipped[:3], **counts}
    return out["train"], out["eval"], stats


def prepare(cfg: DataConfig, tokenizer) -> Splits:
    """Tokenized train and eval splits, from the cache when this data was tokenized before."""
    if cfg.format == "chat":
        from .formats import chat_template

        # Resolved to its text once, before anything is read: a template-less tokenizer is
        # refused up front, rows do not re-read a .jinja file, and the text (not the file name)
        # enters the fingerprint, so editing the template makes a new cache entry.
        cfg = dataclasses.replace(cfg, chat_template=chat_template(cfg, tokenizer))
    _quiet_datasets()
    for k in ("path", "eval_path"):
        if getattr(cfg, k):
            try:
                data_files(getattr(cfg, k))
            except DataError as exc:
                raise DataError(f"data.{k}: {exc}") from None
    key = fingerprint(cfg, tokenizer)
    entry = cache_root(cfg) / key
    hit = lookup(entry)
    cached = hit is not None
    if not cached:
        store(entry, *_build(cfg, tokenizer))
        hit = lookup(entry)  # every rank then uses the same memory-mapped entry
        assert hit is not None
    return Splits(*hit[:2], fingerprint=key, stats=hit[2], cache_hit=cached)


def describe(splits: Splits) -> list[str]:
    """What was read and what was left out, one line per split (nothing is dropped silently)."""
    lines = []
    for name in ("train", "eval"):
        s = splits.stats.get(name, {})
        if not s.get("examples"):
            continue
        line = f"data {name}: {s['examples']} examples"
        if s.get("skipped_rows"):
            line += f", {s['skipped_rows']} malformed rows skipped (first: {s['skipped_first'][0]})"
        if s.get("truncated"):
            line += f", {s['truncated']} truncated to data.max_seq_len"
        if s.get("dropped_too_long"):
            line += f", {s['dropped_too_long']} longer than data.max_seq_len dropped"
        lines.append(line)
    return lines


def load_splits(cfg: DataConfig, tokenizer, is_main: bool, broadcast) -> Splits:
    """Rank 0 fingerprints and tokenizes (or finds the launcher's cache entry) and sends the
    others the entry's key, so they read it without hashing the data again. A rank that cannot
    see the entry (a cache directory not shared between nodes) builds its own."""
    splits = prepare(cfg, tokenizer) if is_main else None
    key = broadcast(splits.fingerprint if splits else None)
    if splits is not None:
        return splits
    hit = lookup(cache_root(cfg) / key)
    if hit is None:
        return prepare(cfg, tokenizer)
    return Splits(*hit[:2], fingerprint=key, stats=hit[2], cache_hit=True)
