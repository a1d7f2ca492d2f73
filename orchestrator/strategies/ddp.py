"""DDP: every rank holds the whole 4-bit base and adapter; adapter gradients are all-reduced."""

from __future__ import annotations

from typing import ContextManager

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy


def broadcast_trainable(model: nn.Module) -> None:
    """Rank 0's trainable weights to every rank, one flat tensor per dtype.

    DDP's own start-up sync broadcasts every parameter, the frozen base included, though every
    rank loaded the same base from the same files (and drew the same LoRA init from the same
    seed; an adapter to start from is read from the same files too): through 250 MB flat
    buffers, and on CPU it turns each rank's memory-mapped weights into private copies. On the
    179M model with a 151k vocabulary that was +586 MiB per rank at start-up (measured); for a
    70B base it would be ~35 GB sent before the first step. Only the adapter is sent here."""
    by_dtype: dict = {}
    for p in model.parameters():
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(p)
    for params in by_dtype.values():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        at = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[at:at + p.numel()].view_as(p))
                at += p.numel()


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size == 1 or not dist.is_initialized():
            self._ddp = None
            return model
        broadcast_trainable(model)
        self._ddp = DistributedDataParallel(
            model,
            device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            find_unused_parameters=self.cfg.find_unused_parameters,
            init_sync=False,  # broadcast_trainable did what is needed of it
        )
        return self._ddp

    def accumulate(self, sync: bool) -> ContextManager:
        if self._ddp is None or sync:
            return contextlib.nullcontext()
        return self._ddp.no_sync()
