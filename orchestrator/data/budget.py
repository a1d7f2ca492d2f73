"""Token-budget batching: the global batch's examples packed best-fit-decreasing into rows of
``data.max_seq_len`` tokens, the rows dealt to ranks and micro-batches of at most
``trainer.micro_batch_size`` rows (a token budget of max_seq_len x rows per micro-batch).

Why across the global batch: packing only a micro-batch's few examples leaves each row part
empty (two 120-token chats in a 256-token row); packing all of a step's examples fills rows to
~97%, so the same examples take fewer, fuller rows. The global batch stays fixed *in examples*
(``trainer.global_batch_size``), so each step trains on exactly the examples it would unpacked
and the loss, the mean over all labelled tokens of the global batch, is unchanged; only the
number of micro-steps per rank varies from step to step (the same on every rank, as sharded
strategies need every rank in every forward). Everything is a pure function of the step's
examples, so resume and rank sharding stay exact.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .sampler import StepSampler


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices per row: longest first, each into the fullest row it still fits (ties: input order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = None
        for r, free in enumerate(room):
            if lengths[i] <= free and (best is None or free < room[best]):
                best = r
        if best is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[best].append(i)
            room[best] -= lengths[i]
    return rows


def balance(sizes: Sequence[int], bins: int, lo: int, hi: int) -> list[list[int]]:
    """Items into ``bins`` bins holding ``lo``..``hi`` items each, largest first into the
    lightest open bin, so bins carry similar token counts (ranks wait less for each other)."""
    assert bins * lo <= len(sizes) <= bins * hi, (len(sizes), bins, lo, hi)
    load = [0] * bins
    members: list[list[int]] = [[] for _ in range(bins)]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for k, i in enumerate(order):
        open_bins = [b for b in range(bins) if len(members[b]) < hi]
        if len(order) - k <= sum(max(0, lo - len(m)) for m in members):
            open_bins = [b for b in open_bins if len(members[b]) < lo]
        b = min(open_bins, key=lambda b: (load[b], b))
        members[b].append(i)
        load[b] += sizes[i]
    return members


def plan_step(lengths: Sequence[int], capacity: int, rows_per_micro: int, world: int,
              rank: int) -> list[list[list[int]]]:
    """This rank's micro-batches for one global batch: per micro-batch, per row, positions in
    ``lengths``. Every rank gets the same number of micro-batches, each with at least one row."""
    rows = best_fit_decreasing(lengths, capacity)
    micro_steps = math.ceil(len(rows) / (world * rows_per_micro))
    while len(rows) < world * micro_steps:  # few rows: unpack a row so no rank idles
        r = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        rows.append([rows[r].pop()])
    tokens = [sum(lengths[i] for i in row) for row in rows]
    mine = balance(tokens, world, micro_steps, micro_steps * rows_per_micro)[rank]
    groups = balance([tokens[r] for r in mine], micro_steps, 1, rows_per_micro)
    return [[rows[mine[g]] for g in group] for group in groups]


class TokenBudgetSampler(StepSampler):
    """StepSampler whose micro-batches are packed rows (lists of example indices per row).
    ``lengths`` is every example's token count (``example_lengths``: the cache's column)."""

    def __init__(self, n: int, global_batch: int, rows_per_micro: int, world: int, rank: int,
                 seed: int, lengths: Sequence[int], capacity: int, fingerprint: str = ""):
        super().__init__(n, global_batch, rows_per_micro, world, rank, seed, fingerprint)
        self.lengths, self.capacity = lengths, capacity

    def _batch(self, step: int) -> tuple[list[int], list[int]]:
        batch = self.global_batch_indices(step)
        return batch, [int(self.lengths[i]) for i in batch]

    def micro_batches(self, step: int) -> list[list[list[int]]]:  # type: ignore[override]
        batch, lengths = self._batch(step)
        plan = plan_step(lengths, self.capacity, self.micro, self.world, self.rank)
        return [[[batch[p] for p in row] for row in mb] for mb in plan]

    def row_fill(self, step: int) -> Optional[float]:
        """Real tokens / (rows x max_seq_len) of the whole global batch at ``step``."""
        _, lengths = self._batch(step)
        rows = best_fit_decreasing(lengths, self.capacity)
        return sum(lengths) / (len(rows) * self.capacity)
