"""Data: read local files, format, tokenize with prompt masking, cache, pack, and hand each rank
its micro-batches.

    sources   local .jsonl/.json/.parquet/.csv files, shard directories, Hugging Face datasets
              -> chunks of rows
    formats   alpaca / chat / text / prompt_completion rows -> (text, trained) segments
    chat      a conversation's trained spans from one render of its template
    tokenize  segments -> ids and labels (-100 on prompt), truncation policy
    pipeline  chunks -> worker processes -> Arrow shards written as they come, with progress
    cache     tokenize once; every rank and later run reads the same Arrow entry
    collate   right-padded or packed micro-batches
    budget    token-budget packing of the whole global batch (best-fit decreasing)
    sampler   deterministic per-rank position, checkpointed
    mixture   several sources, each prepared as above, drawn in exact seeded counts
    batches   the sampler and collate a run's data settings ask for, per optimizer step
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import DataConfig
from . import mixture, pipeline
from .cache import ExampleSet, cache_root, example_lengths, fingerprint, lookup, new_entry, publish
from .budget import PackedRowSampler, TokenBudgetSampler
from .collate import collate, collate_packed, collate_rows, model_inputs, pack_rows
from .formats import chat_template, check_messages, format_alpaca, format_row, prompt_completion
from .prompt import prepare_prompt, prompt_row
from .sampler import StepSampler, eval_shard
from .sources import DataError, Source, chunk_rows, data_files, hub_dataset, is_local, read_rows, split_sources
from .tokenize import IGNORE_INDEX, Example

__all__ = [
    "IGNORE_INDEX", "DataError", "Example", "ExampleSet", "Splits", "StepSampler", "check_data", "check_rows",
    "PackedRowSampler", "TokenBudgetSampler", "collate", "collate_packed", "collate_rows", "eval_shard", "example_lengths",
    "format_alpaca",
    "load_examples", "load_splits", "model_inputs", "pack_rows", "prepare", "prepare_prompt", "prompt_row",
    "read_rows", "split_sources",
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
    elif cfg.format == "prompt_completion":  # conversational rows need the template: checked later
        prompt_completion(row, cfg, where)
    else:
        format_row(row, cfg, where, None)


def check_rows(path: str, cfg: DataConfig, split: Optional[str] = None) -> int:
    """Parse and format every row without tokenizing, so bad data is refused early (``split``:
    a Hugging Face dataset's, data.split by default)."""
    n = 0
    for chunk in Source(path, split=split or cfg.split, cfg=cfg).chunks():
        for where, row in chunk_rows(chunk):
            if isinstance(row, DataError):
                if cfg.on_bad_row != "skip":
                    raise row
                continue
            _check_row(row, cfg, where)
            n += 1
    if not n:
        raise DataError(f"{path}: no rows")
    return n


def check_data(cfg: DataConfig) -> None:
    """check_rows over every source of the run's rows (each mixture source with its own
    settings); the error names the setting whose rows are bad."""
    from ..config.data import eval_source_config, source_config

    each = [(f"data.sources[{i}].{{key}}", source_config(cfg, i)) for i in range(len(cfg.sources))]
    each = each or [("data.{key}", cfg)]
    if cfg.sources and cfg.eval_path:
        each.append(("data.eval_path", eval_source_config(cfg)))
    for label, one in each:
        for _, key, path, split in split_sources(one):
            try:
                check_rows(path, one, split)
            except DataError as exc:
                raise DataError(f"{label.format(key=key)}: {exc}") from None


def _with_template(cfg: DataConfig, tokenizer) -> DataConfig:
    """The chat template resolved to its text once, before anything is read: a template-less
    tokenizer is refused up front (chat; prompt/completion rows only need one when they are
    conversations), rows do not re-read a .jinja file, and the text (not the file name) enters
    the fingerprint, so editing the template makes a new cache entry."""
    if cfg.format == "chat" or (cfg.format == "prompt_completion" and (
            cfg.chat_template or getattr(tokenizer, "chat_template", None))):
        return dataclasses.replace(cfg, chat_template=chat_template(cfg, tokenizer))
    return cfg


def load_examples(path: str, tokenizer, cfg: DataConfig) -> list[Example]:
    """Read and tokenize one file without the cache (tests, small tools)."""
    cfg = dataclasses.replace(cfg, path=path, eval_path=None, eval_split=None, eval_fraction=0.0, num_proc=1)
    cfg = _with_template(cfg, tokenizer)
    _, kept = pipeline.run(cfg, tokenizer, None, keep_examples=True)
    return kept["train"]


#: What a full, over-quota, failing or read-only cache filesystem raises while an entry is written.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES)


def prepare(cfg: DataConfig, tokenizer) -> Splits:
    """Tokenized train and eval splits, from the cache when this data was tokenized before; a
    mixture (data.sources) from its sources' entries (mixture.py)."""
    _quiet_datasets()
    try:
        if cfg.sources:
            train, evals, key, stats, hit = mixture.prepare(cfg, tokenizer, _prepare_one, cache_root(cfg))
            return Splits(train, evals, fingerprint=key, stats=stats, cache_hit=hit)
        return _prepare_one(cfg, tokenizer)
    except OSError as exc:
        root = cache_root(cfg)
        # A named file outside the cache is the data's own (an unreadable row file): not ours to word.
        if exc.errno not in _STORAGE_ERRORS or (
                exc.filename and root.resolve() not in Path(exc.filename).resolve().parents):
            raise
        raise DataError(f"the tokenized data could not be written to the cache at {root}: "
                        f"{os.strerror(exc.errno)} ({exc.filename or root}); its partial entry "
                        "was removed; free space there or set data.cache_dir to another filesystem") from None


def _prepare_one(cfg: DataConfig, tokenizer) -> Splits:
    cfg = _with_template(cfg, tokenizer)
    for _, k, path, split in split_sources(cfg):
        try:
            data_files(path) if is_local(path) else hub_dataset(path, split, cfg)
        except DataError as exc:
            raise DataError(f"data.{k}: {exc}") from None
    key = fingerprint(cfg, tokenizer)  # before any work: the rows' bytes, tokenizer, settings
    entry = cache_root(cfg) / key
    hit = lookup(entry)
    cached = hit is not None
    if not cached:
        tmp = new_entry(entry)
        try:
            stats, _ = pipeline.run(cfg, tokenizer, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, entry, {name: dataclasses.asdict(s) for name, s in stats.items()})
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
            first = (s.get("dropped_first") or ["?"])[0]
            line += f", {s['dropped_too_long']} too long for data.max_seq_len dropped (first: {first})"
        lines.append(line)
    return lines + mixture.describe_sources(splits.stats)


def load_splits(cfg: DataConfig, tokenizer, is_main: bool, broadcast) -> Splits:
    """Rank 0 fingerprints and tokenizes (or finds the launcher's cache entry) and sends the
    others the entry's key, so they read it without hashing the data again. A rank that cannot
    see the entry (a cache directory not shared between nodes) builds its own."""
    splits = prepare(cfg, tokenizer) if is_main else None
    key = broadcast(splits.fingerprint if splits else None)
    if splits is not None:
        return splits
    hit = mixture.load(cache_root(cfg), key) if cfg.sources else lookup(cache_root(cfg) / key)
    if hit is None:
        return prepare(cfg, tokenizer)
    return Splits(*hit[:2], fingerprint=key, stats=hit[2], cache_hit=True)
