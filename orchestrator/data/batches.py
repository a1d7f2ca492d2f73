"""How a rank's training examples become its micro-batches, step by step.

One place picks the sampler the data settings ask for (plain, token-budget packing over the
global batch, or rows packed once over the whole dataset) and the collate that goes with it,
so the training loop asks for ``micro_batches(step)`` and never which packing it runs.

Each micro-batch carries the seed its random draws (LoRA dropout) start from, a hash of the
run's seed, the step and the micro-batch's examples: the masks follow the examples, not a
rank's stream. A resume draws them again without any saved RNG, and a run resumed on another
world size with the same micro-batch size (so the same micro-batches: the sampler gives each
rank a contiguous part of the global batch) draws the same masks, where per-rank streams would
not; only step-scoped packing, which balances rows over the ranks, regroups them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from ..config import RunConfig
from .budget import PackedRowSampler, TokenBudgetSampler
from .cache import example_lengths
from .collate import collate, collate_rows
from .sampler import StepSampler

log = logging.getLogger("orchestrator")


class MicroBatch(NamedTuple):
    seed: int  # for torch.manual_seed before its forward (draw_seed)
    tensors: dict


def draw_seed(seed: int, step: int, examples: Any) -> int:
    """The seed of one micro-batch's random draws: a function of the run's seed, the step and
    the micro-batch's example indices (rows of them when packed), whichever rank computes it."""
    digest = hashlib.blake2b(f"{seed}:{step}:{examples}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # within torch.manual_seed's range


@dataclass
class Batches:
    sampler: StepSampler
    make_batch: Callable[[Any], dict]

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's collated micro-batches of optimizer step ``step`` (1-based)."""
        return [MicroBatch(draw_seed(self.sampler.seed, step, mb), self.make_batch(mb))
                for mb in self.sampler.micro_batches(step - 1)]


def build_batches(cfg: RunConfig, examples: Sequence, fingerprint: str, world: int, rank: int,
                  pad_id: int, announce: bool = False) -> Batches:
    t, d = cfg.trainer, cfg.data
    if d.packing and d.packing_scope == "dataset":  # global batch in rows
        sampler: StepSampler = PackedRowSampler(
            t.global_batch_size, t.micro_batch_size, world, rank, t.seed, example_lengths(examples),
            d.max_seq_len, fingerprint)
        if announce:
            log.info("packing: %d examples into %d rows of %d tokens (%.1f%% full)",
                     len(examples), len(sampler.rows), d.max_seq_len, 100 * sampler.fill)
    elif d.packing:  # token budget: micro_batch_size rows of max_seq_len, packed over the global batch
        sampler = TokenBudgetSampler(
            len(examples), t.global_batch_size, t.micro_batch_size, world, rank, t.seed,
            example_lengths(examples), d.max_seq_len, fingerprint)
    else:
        sampler = StepSampler(len(examples), t.global_batch_size, t.micro_batch_size, world, rank,
                              t.seed, fingerprint=fingerprint)
    if d.packing:
        def make_batch(rows):
            return collate_rows([[examples[i] for i in row] for row in rows], pad_id)
    else:
        def make_batch(indices):
            return collate([examples[i] for i in indices], pad_id)
    return Batches(sampler, make_batch)
