"""Preparation as a stream: rows -> formatted -> tokenized -> Arrow shards, in worker processes.

The launcher (or rank 0) counts the rows and cuts them into chunks; ``data.num_proc`` forked
workers each read, format, tokenize and fit a chunk and send back one Arrow record batch, and
the batches are appended to the entry's files in file order as they arrive. At most a few
chunks are in flight, so memory does not grow with the data, and the output (hence the cache
entry) is the same for any number of workers. A bad row stops the run at the first one in file
order, whichever worker met it.
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import random
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from ..config import DataConfig
from .cache import SplitWriter, record_batch
from .formats import Formatted, format_row
from .progress import Progress
from .sources import Chunk, DataError, Source, chunk_rows, split_sources
from .tokenize import LengthError, example, fit, tokenize_batch

CHUNK_ROWS = 512
QUOTED = 3  # skipped and dropped rows quoted per split

_JOB: dict[str, Any] = {}  # the tokenizer and settings, inherited by forked workers


@dataclass
class SplitStats:
    examples: int = 0
    skipped_rows: int = 0
    skipped_first: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_first: list[str] = field(default_factory=list)

    def add(self, other: "SplitStats") -> None:
        for name in ("examples", "skipped_rows", "truncated", "dropped_too_long"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped_first = (self.skipped_first + other.skipped_first)[:QUOTED]
        self.dropped_first = (self.dropped_first + other.dropped_first)[:QUOTED]


@dataclass
class ChunkResult:
    rows: int
    error: Optional[str] = None
    batches: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, SplitStats] = field(default_factory=dict)
    examples: dict[str, list] = field(default_factory=dict)  # only when asked for (no cache)


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_chunk(chunk: Chunk, split: str, held: frozenset, keep_examples: bool = False) -> ChunkResult:
    """Read, format, tokenize and fit one chunk. Rows whose ordinal is in ``held`` go to eval."""
    tokenizer, cfg = _JOB["tokenizer"], _JOB["cfg"]
    out = ChunkResult(chunk.count)
    stats = {name: SplitStats() for name in ("train", "eval")}
    todo: list[tuple[str, str, Formatted]] = []
    ordinal = chunk.ordinal
    try:
        for where, row in chunk_rows(chunk):
            to = "eval" if split == "eval" or ordinal in held else "train"
            ordinal += 1
            try:
                if isinstance(row, DataError):
                    raise row
                todo.append((where, to, format_row(row, cfg, where, tokenizer)))
            except DataError as exc:
                _bad(stats[split], cfg, str(exc))
        rows: dict[str, list] = {"train": [], "eval": []}
        tokenized = tokenize_batch([f for _, _, f in todo], tokenizer, cfg)
        for (where, to, f), t in zip(todo, tokenized):
            fitted, why = fit(f, t, cfg, where)
            s = stats[to]
            if fitted is None:
                s.dropped_too_long += 1
                s.dropped_first = (s.dropped_first + [why])[:QUOTED]
                continue
            s.examples += 1
            s.truncated += fitted.truncated
            keep_prompt = keep_examples or to == "eval"  # exact-match evaluation reads it
            prompt = "".join(text for text, _ in f.segments[: fitted.target_segment]) if keep_prompt else ""
            rows[to].append((fitted.ids, fitted.labels, fitted.prompt_len, fitted.target, prompt))
            if keep_examples:
                out.examples.setdefault(to, []).append(example(f, fitted))
    except DataError as exc:  # LengthError, or a bad row under data.on_bad_row=error
        return ChunkResult(chunk.count, error=str(exc))
    out.batches = {k: record_batch(v) for k, v in rows.items() if v and not keep_examples}
    out.stats = stats
    return out


def _bad(stats: SplitStats, cfg: DataConfig, message: str) -> None:
    if cfg.on_bad_row != "skip":
        raise DataError(message)
    stats.skipped_rows += 1
    stats.skipped_first = (stats.skipped_first + [message])[:QUOTED]


def _init_worker() -> None:
    # One worker per core: the tokenizer's own threads would only compete with the others.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def ordered_map(fn: Callable, tasks: Iterable[tuple], num_proc: int) -> Iterator[Any]:
    """fn(*task) for every task, in order, on ``num_proc`` forked workers with a bounded number
    of tasks in flight (Pool.imap would read every task ahead: the rows of the whole file).

    A ProcessPoolExecutor, not a multiprocessing.Pool: stopping early (a bad row under
    ``data.on_bad_row=error``, the caller closing the generator) must not kill workers. Pool's
    terminate() does, and a worker killed while it sends its result holds the result queue's
    lock forever, so terminate() then waits on its task thread for good (seen in the suite: the
    strict bad-row case hung). Here the tasks not started are cancelled and the few in flight
    finish; a worker that dies breaks the executor, which raises instead of hanging."""
    if num_proc <= 1:
        for task in tasks:
            yield fn(*task)
        return
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker)
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, *task))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _held_out(total: int, fraction: float, seed: int) -> list[int]:
    """The eval rows' ordinals: a seeded choice of ``fraction`` of the rows, in file order."""
    k = max(1, round(total * fraction))
    if k >= total:
        raise DataError(f"data.eval_fraction={fraction} of {total} rows leaves no training rows")
    return sorted(random.Random(seed).sample(range(total), k))


def _tasks(sources: list[tuple[str, str, Source]], held: list[int], keep: bool) -> Iterator[tuple]:
    for split, _, source in sources:
        for chunk in source.chunks():
            lo = bisect.bisect_left(held, chunk.ordinal) if split == "train" else 0
            hi = bisect.bisect_left(held, chunk.ordinal + chunk.count) if split == "train" else 0
            yield chunk, split, frozenset(held[lo:hi]), keep


def _sources(cfg: DataConfig) -> list[tuple[str, str, Source]]:
    out = []
    for split, key, path, dataset_split in split_sources(cfg):
        try:
            out.append((split, key, Source(path, CHUNK_ROWS, dataset_split, cfg)))
        except DataError as exc:
            raise DataError(f"data.{key}: {exc}") from None
    return out


def run(cfg: DataConfig, tokenizer, out_dir: Optional[Path], keep_examples: bool = False,
        label: str = "tokenizing") -> tuple[dict[str, SplitStats], dict[str, list]]:
    """Prepare both splits into ``out_dir`` (train.arrow, eval.arrow), or keep the examples in
    memory (``keep_examples``: tests and small tools). Returns the statistics per split."""
    sources = _sources(cfg)
    train_total = sources[0][2].total
    held = _held_out(train_total, cfg.eval_fraction, cfg.split_seed) if cfg.eval_fraction > 0 and train_total else []
    total = sum(s.total for _, _, s in sources)
    num_proc = cfg.num_proc or default_num_proc()
    if total <= CHUNK_ROWS:
        num_proc = 1  # one chunk: starting workers costs more than it saves
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stats = {"train": SplitStats(), "eval": SplitStats()}
    kept: dict[str, list] = {"train": [], "eval": []}
    writers = {name: SplitWriter(out_dir / f"{name}.arrow") for name in stats} if out_dir else {}
    key_of = {split: key for split, key, _ in sources}
    rows_of = {split: src.total for split, _, src in sources}
    progress = Progress(total, label)
    _JOB.update(tokenizer=tokenizer, cfg=cfg)
    try:
        for chunk_split, result in _with_split(_tasks(sources, held, keep_examples), num_proc):
            if result.error:
                raise DataError(f"data.{key_of[chunk_split]}: {result.error}")
            for name in stats:
                stats[name].add(result.stats[name])
            for name, batch in result.batches.items():
                writers[name].write(batch)
            for name, examples in result.examples.items():
                kept[name] += examples
            progress.update(result.rows)
    finally:
        progress.close()
        _JOB.clear()
        failed = None
        for w in writers.values():  # every one, even when one fails to finish
            try:
                w.close()
            except OSError as exc:
                failed = failed or exc
        if failed is not None and sys.exc_info()[0] is None:  # else what is in flight says more
            raise failed
    if held:
        rows_of = {"train": train_total - len(held), "eval": len(held)}
    for split, key, source in sources:
        if source.total == 0 or (stats[split].examples == 0 and stats[split].skipped_rows == rows_of[split]):
            s = stats[split]
            why = f" ({s.skipped_rows} bad rows skipped, first: {s.skipped_first[0]})" if s.skipped_rows else ""
            raise DataError(f"data.{key}: {getattr(cfg, key)}: no rows{why}")
    for split in stats:
        s = stats[split]
        if rows_of.get(split) and not s.examples:
            raise DataError(f"data.{key_of.get(split, 'path')}: no usable rows ({s.dropped_too_long} longer than "
                            f"data.max_seq_len={cfg.max_seq_len} dropped, first: "
                            f"{(s.dropped_first or s.skipped_first or ['-'])[0]}; {s.skipped_rows} skipped)")
    return stats, kept


def _with_split(tasks: Iterator[tuple], num_proc: int) -> Iterator[tuple[str, ChunkResult]]:
    splits: deque = deque()

    def remember() -> Iterator[tuple]:
        for task in tasks:
            splits.append(task[1])
            yield task

    for result in ordered_map(process_chunk, remember(), num_proc):
        yield splits.popleft(), result


__all__ = ["LengthError", "SplitStats", "default_num_proc", "run"]
