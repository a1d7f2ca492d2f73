"""Optimizer and learning-rate schedule over the trainable (adapter) parameters."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the given parameters; fused/foreach kernels are left to torch's defaults."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: did LoRA attach to any module?")
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine/linear/constant decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))


def continue_schedule(opt: torch.optim.Optimizer, scheduler, cfg: OptimConfig, total_steps: int,
                      step: int) -> None:
    """Put the optimizer's hyperparameters and the schedule at ``step`` of *this* run's config.

    A loaded optimizer state carries the hyperparameters it was saved with, and LambdaLR's the
    peak lr it started from, so without this an extended or forked run would keep the old lr,
    betas, eps and weight decay for its first step (and a fork with another optim.lr for good).
    For a plain resume every value is the one already there.
    """
    groups = opt.param_groups
    for g in groups:
        g.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(step, cfg, total_steps),
                 betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() answers
