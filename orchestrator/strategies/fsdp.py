"""FSDP2: ``fully_shard`` per decoder layer plus the root, over a 1-D device mesh, or a 2-D one
(replicate x shard, HSDP) with ``replicate`` groups (mesh.py says why).

Two modes:
- ``shard_base=false``: the frozen 4-bit base is left out of FSDP (``ignored_params``), so
  every rank keeps all of it and no base weight is all-gathered per step; the LoRA adapters,
  their gradients and optimizer state are sharded.
- ``shard_base=true``: the packed 4-bit weights are sharded too (stored in the compute dtype
  so FSDP can split and all-gather them, as FSDP-QLoRA does), so a base larger than one
  device trains across several.

The root is the transformers model inside the PEFT wrapper, not the PeftModel: ``generate``
calls the transformers model directly, and its forward must run the root's hooks.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from ..config import LoraConfig, ModelConfig, QuantConfig
from ..families import decoder_blocks
from .base import Strategy
from .mesh import build_mesh


class FSDPStrategy(Strategy):
    name = "fsdp"
    synced_forward = True

    def quant_storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        # FSDP shards and all-gathers float tensors; the packed 4-bit bytes ride in the compute
        # dtype (bf16 on GPUs), which also keeps mixed-precision casts no-ops on them.
        return compute_dtype if self.cfg.shard_base else torch.uint8

    def load_model(self, model_cfg: ModelConfig, quant: QuantConfig, lora: LoraConfig) -> nn.Module:
        """With a sharded base and low-memory loading, rank 0 alone loads; the others get an
        empty (meta) model that ``wrap`` shards and then fills from rank 0."""
        self._source = None
        self._meta = self.cfg.shard_base and self.cfg.low_memory_load and self.dist.world_size > 1
        if not self._meta:
            return super().load_model(model_cfg, quant, lora)
        from ..lowmem import load_for_sharding

        model, self._source = load_for_sharding(
            model_cfg, quant, lora, self.compute_dtype,
            self.quant_storage_dtype(self.compute_dtype), self.dist,
        )
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import (
            CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
        )

        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("strategy=fsdp needs a process group; launch with torchrun")
        mesh = build_mesh(self.dist.device.type, self.cfg.replicate, self.dist.world_size)
        hf_model = model.base_model.model  # PeftModel -> LoraModel -> transformers model
        ignored = None
        if not self.cfg.shard_base:
            ignored = {p for p in hf_model.parameters() if not p.requires_grad}
        mp = MixedPrecisionPolicy()
        if self.cfg.mixed_precision:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if self.cfg.cpu_offload else OffloadPolicy()
        kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)
        for layer in decoder_blocks(hf_model):
            fully_shard(layer, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        fully_shard(hf_model, reshard_after_forward=self.cfg.reshard_after_forward, **kwargs)
        if self._meta:
            from ..lowmem import fill_from_rank0

            param_device = torch.device("cpu") if self.cfg.cpu_offload else self.dist.device
            fill_from_rank0(model, self._source, self.dist, param_device)
            self._source = None  # rank 0's full copy is no longer needed
        self._root = hf_model
        return model

    def accumulate(self, sync: bool) -> ContextManager:
        self._root.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All ranks gather the sharded adapter; rank 0 keeps full CPU tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(self.model, options=opts)
        return state if self.dist.is_main else None
