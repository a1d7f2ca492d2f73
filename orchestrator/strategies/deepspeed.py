"""DeepSpeed ZeRO-2 (adapter gradients and optimizer state sharded) and ZeRO-3 (parameters,
the 4-bit base included, sharded too).

DeepSpeed runs in fp32 mode here and our torch autocast supplies the mixed precision, as for
the other strategies: the engine never casts the model, so the bitsandbytes weights and the
fp32 LoRA master weights stay as loaded. Loss scaling and accumulation boundaries come from the
loop (``scale_wrt_gas=False``, ``set_gradient_accumulation_boundary``), so the loss is the same
global token mean as with DDP and FSDP.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..config import OptimConfig
from ..optim import build_optimizer, build_scheduler
from .base import BatchPlan, Strategy

log = logging.getLogger("orchestrator")


def load_jit_ops() -> None:
    """Load the op DeepSpeed compiles on first use (the CPU shared-memory collective) before
    ``init_distributed`` asks for it, under a lock that dies with its holder.

    torch guards each extension build with a bare ``lock`` file in its build directory. A rank
    killed while holding it (Ctrl-C, a crashed sibling, a preempted job, during the ~1 s that
    even an up-to-date load takes) leaves the file behind, and every later run on that machine
    waits for it forever, silently. Holding an flock, which the kernel releases when a process
    dies, while we load means a torch lock seen under it belongs to a build that no longer runs,
    so it is removed. DeepSpeed caches the loaded op per process; ``init_distributed`` then finds
    it without touching the build directory again. On CUDA the op does not exist and nothing
    happens.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    try:
        guard = open(build_dir.parent / f".{builder.name}.orchestrator-lock", "w")
    except OSError:  # a read-only extensions directory: a prebuilt op, nothing to build or lock
        builder.load(verbose=False)
        return
    with guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build of %s that was killed; the op is rebuilt "
                        "or reloaded now", stale, builder.name)
            stale.unlink()
        builder.load(verbose=False)


class _Released4bitMatmul(torch.autograd.Function):
    """``x @ W.T + b`` for a 4-bit weight that ZeRO-3 gathers and releases, keeping only the
    parameter object for the backward, not its gathered storage.

    bitsandbytes' own function keeps a *view* of the packed weight (``B.view(-1, 1)`` in
    ``ctx.tensors``) for the input gradient. DeepSpeed releases a gathered parameter by
    swapping its ``.data`` for an empty tensor, which leaves that view, and so every layer's
    gathered weight, alive until the layer's backward: measured on the 50M model, 23.5 of its
    24.8 MiB packed base per rank after one forward on 2 ranks, where each rank's shard is half
    (benchmarks/saved_activations.py). Here the backward reads the weight from the parameter
    again, which DeepSpeed has gathered anew for that layer's backward by then (it re-gathers
    released parameters before a module's backward), so between the two only the shard is
    held. The numbers are bitsandbytes' own: the same kernel forward, the same dequantized
    weight for the input gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias):  # type: ignore[override]
        import bitsandbytes as bnb

        ctx.weight = weight  # the Parameter: its .data is swapped on release, not kept
        ctx.bias_dtype = None if bias is None else bias.dtype
        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        import bitsandbytes as bnb

        weight = ctx.weight
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            dense = bnb.functional.dequantize_4bit(weight.data.view(-1, 1), weight.quant_state)
            grad_x = torch.matmul(grad, dense.to(grad.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        return grad_x, None, grad_bias


def _released_4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear4bit.forward`` (bitsandbytes 0.50) with ``_Released4bitMatmul`` as the
    matmul; the same casts around it."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(self.compute_dtype)
    return _Released4bitMatmul.apply(x, self.weight, bias).to(inp_dtype)


def release_gathered_4bit_weights(model: nn.Module) -> int:
    """Route every 4-bit linear of ``model`` through ``_Released4bitMatmul`` (ZeRO-3 only);
    returns how many."""
    import types

    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = types.MethodType(_released_4bit_forward, module)
            n += 1
    return n


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    @property
    def synced_forward(self) -> bool:  # type: ignore[override]
        return self.cfg.zero_stage == 3

    def quant_storage_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        # ZeRO-3 partitions the packed weights, which needs a float dtype; its checkpoints
        # only work with bf16 storage (fp32 and uint8 fail inside bitsandbytes; FACTS.md).
        return torch.bfloat16 if self.cfg.zero_stage == 3 else torch.uint8

    def ds_config(self, plan: BatchPlan) -> dict:
        zero: dict = {"stage": self.cfg.zero_stage}
        if self.cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.cfg.zero_stage == 3 and self.cfg.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        if self.cfg.zero_stage == 3:
            # ZeRO-3 otherwise replaces torch.nn.functional.linear, process-wide, with its own
            # autograd function, which saves the fp32 input and weight of every LoRA linear
            # instead of autocast's compute-dtype copies: twice the bytes of those activations
            # (+54 MB saved per 4x128-token micro-batch on a 50M model). It only pays when the
            # saved weight is large and trainable, which LoRA's never is; the frozen 4-bit base
            # goes through bitsandbytes' own function either way.
            zero["memory_efficient_linear"] = False
        config = {
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.accumulation,
            "train_batch_size": plan.micro_batch * plan.accumulation * self.dist.world_size,
            "gradient_clipping": plan.max_grad_norm,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.compute_dtype != torch.float32:
            config["torch_autocast"] = self.autocast_section()
        return config

    def autocast_section(self) -> dict:
        """DeepSpeed's ``torch_autocast`` section: the engine's forward in the compute dtype.

        Without it the engine turns off any CUDA autocast it finds active around its forward (a
        warning, then fp32 compute: slower, more activation memory, losses no longer DDP's). On
        CPU its check reads CUDA autocast only, so the loop's own autocast went through and
        tests could not see this. No module is listed as "lower-precision safe": DeepSpeed
        would otherwise mark every plain ``nn.Linear`` (each LoRA A and B) to all-gather and
        reduce in bf16, where the other strategies keep adapter weights and gradients in fp32.
        """
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.compute_dtype]
        return {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("DeepSpeed wraps model and optimizer together; see setup()")

    def setup(self, model: nn.Module, optim: OptimConfig, total_steps: int, plan: BatchPlan) -> None:
        """deepspeed.initialize takes the model, optimizer and schedule at once."""
        import deepspeed

        load_jit_ops()
        deepspeed.init_distributed(dist_backend=self.dist.backend)
        self.model = model
        self.plan = plan
        if self.cfg.zero_stage == 3:
            release_gathered_4bit_weights(model)
        optimizer = build_optimizer(model.parameters(), optim)
        scheduler = build_scheduler(optimizer, optim, total_steps)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.ds_config(plan),
        )
        self.engine = engine
        self.train_module = engine
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler

    @property
    def eval_module(self) -> nn.Module:
        return self.engine.module

    def accumulate(self, sync: bool) -> ContextManager:
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def holdings(self) -> dict[str, int]:
        out = super().holdings() if self.cfg.zero_stage != 3 else self._zero3_holdings()
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        out["optimizer_bytes"] = sum(
            v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        return out

    def _zero3_holdings(self) -> dict[str, int]:
        base = adapter = 0
        for p in self.model.parameters():
            t = getattr(p, "ds_tensor", p)
            n = t.numel() * t.element_size()
            if p.requires_grad:
                adapter += n
            else:
                base += n
        return {"base_bytes": base, "adapter_bytes": adapter, "optimizer_bytes": 0}

    # -- state: DeepSpeed's own checkpoint format ------------------------------------------
    def save_state(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_state(self, path: Path, optimizer: bool = True) -> None:
        # Frozen base weights are excluded from the checkpoint, so the module load is non-strict.
        load_path, _ = self.engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_module_strict=False,
            load_optimizer_states=optimizer, load_lr_scheduler_states=optimizer,
            load_module_only=not optimizer,
        )
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load")

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.cfg.zero_stage != 3:
            return super().adapter_state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if not self.dist.is_main:
                return None
            return {n: p.detach().to("cpu", copy=True) for n, p in params}
