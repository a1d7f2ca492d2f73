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

import bisect
import heapq
import math
from typing import Any, Optional, Sequence

import numpy as np

from .sampler import StepSampler
from .sources import DataError


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices per row: longest first, each into the fullest row it still fits (ties: the
    lowest row). Rows are kept by free space, so a million examples pack in seconds: each
    placement is a bisection over the distinct free sizes (at most ``capacity``), not a scan
    of every row."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    rows: list[list[int]] = []
    frees: list[int] = []  # sorted free sizes that some open row has
    by_free: dict[int, list[int]] = {}  # free size -> heap of row numbers
    for i in order:
        need = int(lengths[i])
        k = bisect.bisect_left(frees, need)
        if k == len(frees):
            r, free = len(rows), capacity - need
            rows.append([i])
        else:
            heap = by_free[frees[k]]
            r, free = heapq.heappop(heap), frees[k] - need
            if not heap:
                del by_free[frees.pop(k)]
            rows[r].append(i)
        if free > 0:
            if free not in by_free:
                bisect.insort(frees, free)
                by_free[free] = []
            heapq.heappush(by_free[free], r)
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


class PackedRowSampler(StepSampler):
    """``data.packing_scope=dataset``: the whole training set packed once, best-fit-decreasing,
    into rows of ``data.max_seq_len`` tokens (as TRL's bfd packing and torchtune's
    PackedDataset do); each epoch shuffles the rows, and the global batch is
    ``trainer.global_batch_size`` *rows*, a fixed token budget. Rows come out ~98% full where
    step-scoped packing, bound to a step's few examples, leaves a part-empty row per step.

    The rows are a pure function of the lengths and the step's slice of an epoch's row
    permutation a pure function of (seed, step), so resume and rank sharding stay exact; the
    loss stays the mean over the step's labelled tokens. What changes against ``step`` scope:
    which examples share a step (and how many), fixed per row for the whole run.
    """

    unit = "rows"

    def __init__(self, global_batch: int, rows_per_micro: int, world: int, rank: int, seed: int,
                 lengths: Sequence[int], capacity: int, fingerprint: str = ""):
        self.rows = best_fit_decreasing(lengths, capacity)
        if len(self.rows) < global_batch:
            raise DataError(
                f"the training set packs into {len(self.rows)} rows of data.max_seq_len={capacity} "
                f"tokens, fewer than trainer.global_batch_size={global_batch} (counted in rows "
                "with data.packing_scope=dataset)")
        super().__init__(len(self.rows), global_batch, rows_per_micro, world, rank, seed, fingerprint)
        self.lengths, self.capacity = lengths, capacity
        self.fill = float(np.sum(lengths, dtype=np.int64)) / (len(self.rows) * capacity)

    def packing_stats(self) -> dict[str, Any]:
        return {"packing_scope": "dataset", "packed_rows": len(self.rows), "row_fill": self.fill}

    def micro_batches(self, step: int) -> list[list[list[int]]]:  # type: ignore[override]
        return [[self.rows[r] for r in mb] for mb in super().micro_batches(step)]

    def row_fill(self, step: int) -> Optional[float]:
        """Real tokens / (rows x max_seq_len) of the whole global batch at ``step``."""
        rows = [self.rows[r] for r in self.global_batch_indices(step)]
        return sum(int(self.lengths[i]) for row in rows for i in row) / (len(rows) * self.capacity)
