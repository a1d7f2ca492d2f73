"""DDP: every rank holds the whole 4-bit base and adapter; adapter gradients are all-reduced."""

from __future__ import annotations

from typing import ContextManager

import contextlib

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size == 1 or not dist.is_initialized():
            self._ddp = None
            return model
        self._ddp = DistributedDataParallel(
            model,
            device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
            find_unused_parameters=self.cfg.find_unused_parameters,
        )
        return self._ddp

    def accumulate(self, sync: bool) -> ContextManager:
        if self._ddp is None or sync:
            return contextlib.nullcontext()
        return self._ddp.no_sync()
