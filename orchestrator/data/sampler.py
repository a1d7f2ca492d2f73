"""Which examples each rank trains on at each step, and how that position is checkpointed.

The sampler is a pure function of (seed, step): the global batch of step s is the same slice of
the same epoch permutation whatever the world size, and each rank takes its contiguous part.
That gives two properties the tests check: a run on one rank with batch 2B sees exactly the
examples of two ranks with batch B, and resuming at step s needs nothing but s. The checkpoint
still records the position with the data fingerprint, so a resume over changed data (or a
changed batch size) is refused instead of silently seeing other examples.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .sources import DataError


class StepSampler:
    """Micro-batch indices for (step, rank), deterministic in the seed.

    Epoch e uses permutation(seed + e); step s's global batch is the s-th slice of it (an
    incomplete last slice is dropped), and rank r takes the r-th contiguous part. What is
    permuted is examples here and packed rows in ``PackedRowSampler`` (``unit``).
    """

    unit = "examples"

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int,
                 fingerprint: str = ""):
        if n < global_batch:
            raise DataError(
                f"the training set has {n} examples, fewer than trainer.global_batch_size={global_batch}"
            )
        self.n, self.global_batch, self.micro = n, global_batch, micro_batch
        self.world, self.rank, self.seed = world, rank, seed
        self.fingerprint = fingerprint
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_batch_indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[i * self.global_batch : (i + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        batch = self.global_batch_indices(step)
        per_rank = self.global_batch // self.world
        local = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [local[j : j + self.micro] for j in range(0, per_rank, self.micro)]

    def packing_stats(self) -> dict[str, Any]:
        """What summary.json records of the packing (nothing: this sampler does not pack)."""
        return {}

    def state_dict(self, steps_done: int) -> dict[str, Any]:
        """The position after ``steps_done`` optimizer steps, for the checkpoint."""
        epoch, index = divmod(steps_done, self.steps_per_epoch)
        return {"steps_done": steps_done, "epoch": epoch, "batch_in_epoch": index, "seed": self.seed,
                "num_examples": self.n, "global_batch": self.global_batch, "fingerprint": self.fingerprint,
                "unit": self.unit}

    def load_state_dict(self, state: Optional[dict[str, Any]], step: int) -> None:
        """Refuse a checkpoint position that belongs to other data or sampling settings."""
        if state is None:  # written before positions were recorded: nothing to compare
            return
        mine = self.state_dict(step)
        state = {"unit": "examples", **state}  # positions written before rows could be the unit
        differ = [k for k in ("steps_done", "fingerprint", "num_examples", "global_batch", "seed", "unit")
                  if state.get(k) != mine[k]]
        if differ:
            raise DataError(
                "the checkpoint was written for other data or sampling ("
                + ", ".join(f"{k}: {state.get(k)!r} then, {mine[k]!r} now" for k in differ)
                + "); resuming would not see the same examples"
            )


def eval_shard(n: int, world: int, rank: int) -> list[Optional[int]]:
    """This rank's eval indices, padded with None so every rank runs the same number of batches
    (sharded strategies need every rank in every forward)."""
    per_rank = -(-n // world)
    own: list[Optional[int]] = list(range(rank, n, world))
    return own + [None] * (per_rank - len(own))
