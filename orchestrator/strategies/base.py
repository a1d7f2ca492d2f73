"""The one interface the training loop talks to, whatever shards what.

A strategy decides how the PEFT model is wrapped, how gradients are synchronised and
accumulated, how a step is taken, how training state is saved and restored, and how the
adapter is gathered for export. The loop never asks which strategy it runs.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..config import LoraConfig, ModelConfig, OptimConfig, QuantConfig
from ..distributed import DistInfo
from ..model import attach_lora, load_base
from ..optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split on each rank (DeepSpeed wants to know up front)."""

    micro_batch: int
    accumulation: int
    max_grad_norm: float


class Strategy(ABC):
    name: str = "base"
    #: True when every rank must take part in every forward (parameters are sharded), so
    #: generation must keep ranks in lock-step.
    synced_forward: bool = False

    def __init__(self, cfg, dist: DistInfo, compute_dtype: torch.dtype):
        self.cfg = cfg
        self.dist = dist
        self.compute_dtype = compute_dtype
        self.model: nn.Module | None = None  # the PEFT model, unwrapped
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def quant_storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """Dtype the packed 4-bit weights should be stored in for this strategy."""
        return torch.uint8

    def load_model(self, model_cfg: ModelConfig, quant: QuantConfig, lora: LoraConfig) -> nn.Module:
        """The PEFT model this rank trains: by default every rank loads the whole base."""
        base = load_base(model_cfg, quant, self.compute_dtype, self.dist.device,
                         storage_dtype=self.quant_storage_dtype(self.compute_dtype))
        return attach_lora(base, lora)

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the parallelism to ``model``; return the module the loop calls forward on."""

    def setup(self, model: nn.Module, optim: OptimConfig, total_steps: int, plan: BatchPlan) -> None:
        """Wrap the model, then build optimizer and schedule over its (possibly sharded)
        trainable parameters."""
        self.model = model
        self.plan = plan
        self.train_module = self.wrap(model)
        self.optimizer = build_optimizer(model.parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)

    @property
    def eval_module(self) -> nn.Module:
        """The module to run evaluation and generation on (no gradient sync involved)."""
        assert self.model is not None
        return self.model

    def accumulate(self, sync: bool) -> ContextManager:
        """Context for one micro-step; gradients are synchronised only when ``sync``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def step(self, max_grad_norm: float) -> float:
        """Clip, step the optimizer and schedule, clear gradients; returns the global grad norm
        (before clipping), or nan when it was not finite and the step was skipped."""
        norm = self.clip_grad_norm(max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def holdings(self) -> dict[str, int]:
        """Bytes this rank holds locally: frozen base, trainable adapter, optimizer state.

        Sharded parameters (DTensors) count only their local shard, so the numbers show what
        each strategy really distributes.
        """
        def local_bytes(t: torch.Tensor) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        base = adapter = 0
        for p in self.model.parameters():
            if p.requires_grad:
                adapter += local_bytes(p)
            else:
                base += local_bytes(p)
        optim = sum(
            local_bytes(v) for st in self.optimizer.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        return {"base_bytes": base, "adapter_bytes": adapter, "optimizer_bytes": optim}

    # -- state ---------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Write adapter weights, optimizer and schedule into ``path`` (all ranks call this).

        torch.distributed.checkpoint handles replicated (DDP) and sharded (FSDP2) parameters
        alike, each rank writing its own part; frozen base weights are not saved.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "state"))
        if self.dist.is_main:
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")

    def load_state(self, path: Path, optimizer: bool = True) -> None:
        """Restore what ``save_state`` wrote; with ``optimizer=False`` only the adapter weights
        (DCP reads just the keys asked for)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=True)
        if optimizer:
            msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
            state = {"model": msd, "optim": osd}
        else:  # get_state_dict would give the fresh optimizer state by taking a zero step
            state = {"model": get_model_state_dict(self.model, options=opts)}
        dcp.load(state, checkpoint_id=str(path / "state"))
        # Frozen base weights are not in checkpoints (ignore_frozen_params), so the model load
        # is non-strict; every trainable tensor was requested above and dcp.load fails if the
        # checkpoint lacks one.
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        if not optimizer:
            set_model_state_dict(self.model, state["model"], options=options)
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full adapter tensors on rank 0 (None elsewhere), keyed as in the PEFT model."""
        if not self.dist.is_main:
            return None
        return {
            n: p.detach().to("cpu", copy=True)
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }

    def save_adapter(self, out_dir: Path) -> None:
        """Standard PEFT adapter (adapter_config.json + adapter_model.safetensors) on rank 0."""
        state = self.adapter_state_dict()
        if self.dist.is_main:
            self.model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
