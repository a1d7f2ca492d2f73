"""The data's real lengths: the longest row of any micro-batch the run will really form.

Activations, logits and the attention mask grow with the micro-batch's padded width, and an
unpacked micro-batch pads only to its longest row. Planning every row at ``data.max_seq_len``
over-predicts short-row data by far (+77% on a 135M model with short instruction rows), so the
plan reads the prepared (tokenized, cached) data instead:

- unpacked: every micro-batch holds ``trainer.micro_batch_size`` rows padded to its longest, so
  the widest one is as wide as the longest example the sampler will draw in the whole run. The
  sampler is a pure function of (seed, step) and its global batches do not depend on the
  micro-batch size or the world size, so this is one number per run, exact;
- packed: rows are filled towards the token budget (``data.max_seq_len`` per row), so the plan
  keeps the budget;
- eval: the longest eval example (evaluation pads each batch to its longest row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class DataLengths:
    """Widths (tokens) the plan uses instead of ``data.max_seq_len``."""

    train: int  # the widest training micro-batch
    eval: int  # the widest eval batch; 0: no eval set
    max_seq_len: int
    packed: bool = False


def example_lengths(examples: Sequence[Any]) -> np.ndarray:
    """Token count of every example (the tokenized cache's ``length`` column; data/cache.py)."""
    from ..data.cache import example_lengths as lengths

    return lengths(examples)


def longest_drawn(lengths: np.ndarray, global_batch: int, seed: int, steps: int) -> int:
    """The longest example the sampler draws in ``steps`` optimizer steps (its own permutations,
    through its public API); stops as soon as the longest example of all has been drawn."""
    from ..data.sampler import StepSampler

    longest = int(lengths.max())
    if len(lengths) < global_batch:  # the run itself refuses this; plan the worst case
        return longest
    sampler = StepSampler(len(lengths), global_batch, global_batch, 1, 0, seed)
    seen = 0
    for step in range(steps):
        seen = max(seen, int(lengths[sampler.global_batch_indices(step)].max()))
        if seen == longest:
            break
    return seen


def total_steps(cfg, n_train: int) -> int:
    """Optimizer steps of the run, as train.py counts them."""
    t = cfg.trainer
    return t.max_steps if t.max_steps > 0 else t.epochs * max(1, n_train // t.global_batch_size)


def data_lengths(cfg, train: Sequence[Any], eval_: Optional[Sequence[Any]] = None) -> DataLengths:
    """The widths a run of ``cfg`` on these prepared examples will meet."""
    eval_width = int(example_lengths(eval_).max()) if eval_ is not None and len(eval_) else 0
    if cfg.data.packing:
        if cfg.data.packing_scope == "dataset":  # refuses, before launch, too few rows for a step
            from ..data.budget import PackedRowSampler

            PackedRowSampler(cfg.trainer.global_batch_size, 1, 1, 0, cfg.trainer.seed,
                             example_lengths(train), cfg.data.max_seq_len)
        return DataLengths(cfg.data.max_seq_len, eval_width, cfg.data.max_seq_len, packed=True)
    lengths = example_lengths(train)
    width = longest_drawn(lengths, cfg.trainer.global_batch_size, cfg.trainer.seed,
                          total_steps(cfg, len(lengths)))
    return DataLengths(width, eval_width, cfg.data.max_seq_len)
