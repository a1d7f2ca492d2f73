"""The training loop: model -> strategy -> data -> micro-steps -> eval, checkpoints, outputs.

Loss normalisation: each optimizer step's loss is the mean over *all* labelled tokens of the
global batch, whatever the world size and accumulation, so one rank with batch 2B and two ranks
with batch B take the same step. Each rank scales its token-loss sum by world / global tokens
because the strategies average gradients over ranks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, commcount, faults, hostalloc, rundir
from .config import RunConfig, accumulation_steps
from .data import describe, load_splits, model_inputs
from .data.batches import Batches, build_batches
from .distributed import (
    DistInfo, all_gather_floats, all_gather_object, all_reduce_sum, broadcast_object, init_distributed,
    peak_memory_mb, resolve_precision, set_phase, shutdown,
)
from .evaluate import evaluate_run
from .loss import build_loss
from .metrics import build_logger
from .model import ForwardDtypeProbe, base_linear_storage, compute_autocast, count_parameters, load_tokenizer
from .optim import continue_schedule
from .plan import MiB
from .preempt import StopRequest
from .record import log_memory, planned_peak_mb, report_holdings, run_record
from .runinfo import code_info, peak_flops
from .strategies import BatchPlan, build_strategy, needs_cpu_collectives

log = logging.getLogger("orchestrator")


class NonFiniteError(RuntimeError):
    pass


@dataclass
class RunResult:
    summary: dict[str, Any]
    model: Any = None  # the trained PEFT model (in-process runs and tests)
    losses: list[float] = field(default_factory=list)
    stopped: bool = False  # a stop request ended the run early, after a checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _starting_point(cfg: RunConfig, run_dir: Path, strategy, sampler, dist: DistInfo,
                    total_steps: int) -> tuple[dict[str, Any], int, str]:
    """Where training starts, as (trainer state, step, what to say of it): this run's latest
    checkpoint (a resume), else the checkpoint ``run.fork_from`` names (the parent is only
    read), else step 0. The optimizer's hyperparameters and the schedule are this run's config
    at that step in every case (optim.continue_schedule)."""
    own = checkpoint.latest(run_dir) if cfg.run.resume else None
    state: dict[str, Any] = {}
    step, origin = 0, ""
    if own is not None:
        set_phase(f"checkpoint load ({own})")
        state = checkpoint.load(own, strategy)
        step, origin = state["step"], f" (resuming at step {state['step']} from {own})"
        sampler.load_state_dict(state.get("sampler"), step)
    elif cfg.run.fork_from:
        source = checkpoint.resolve(Path(cfg.run.fork_from))
        set_phase(f"fork load ({source})")
        everything = cfg.run.fork_optimizer
        parent = checkpoint.load(source, strategy, everything=everything)
        state["forked_from"] = {"checkpoint": str(source), "run": str(checkpoint.run_of(source)),
                                "step": parent["step"], "optimizer": everything}
        if everything:  # the parent's step and data position go on; its tallies do not
            step = parent["step"]
            sampler.load_state_dict(parent.get("sampler"), step)
        origin = (f" (forked from {source} at its step {parent['step']}, "
                  + ("with its optimizer, step and data position)" if everything else
                     "its adapter only: step 0, a fresh optimizer)"))
    continue_schedule(strategy.optimizer, strategy.scheduler, cfg.optim, total_steps, step)
    return state, step, origin


def _write(logger, write, *args):
    """A checkpoint or adapter that cannot be written stops the run on every rank
    (CheckpointWriteError); the sinks are closed first so that what was logged is kept."""
    try:
        return write(*args)
    except checkpoint.CheckpointWriteError:
        logger.close()
        raise


def run(cfg: RunConfig, run_dir: Path) -> RunResult:
    """Train per ``cfg`` on this rank, writing outputs into ``run_dir``."""
    dist = init_distributed(getattr(cfg.launcher, "dist_timeout_s", 600),
                            cpu_collectives=needs_cpu_collectives(cfg.strategy))
    # No barrier on failure: the other ranks may be inside a collective that this rank will
    # never join; exiting lets torchrun tear the group down instead of hanging.
    try:
        result = _run(cfg, Path(run_dir), dist)
    except checkpoint.CheckpointWriteError:
        shutdown()  # every rank agreed to stop here: they can leave the group together
        raise
    shutdown()
    return result


@dataclass
class _Model:
    """What loading gives the loop: the strategy (which owns the wrapped model, optimizer and
    schedule once set up), the PEFT model, and how it computes."""

    strategy: Any
    model: Any
    tokenizer: Any
    compute_dtype: torch.dtype
    autocast: Any
    loss_fn: Any
    loss_kind: str
    base_storage: Any
    trainable: int
    total: int


@dataclass
class _Step:
    """One optimizer step's outcome, as every rank agrees on it."""

    loss: float
    grad_norm: float
    lr: float
    local_tokens: int
    global_tokens: float
    global_positions: float
    seconds: float = 0.0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _load_model(cfg: RunConfig, dist: DistInfo) -> _Model:
    t = cfg.trainer
    compute_dtype = resolve_precision(t.precision, dist.device)
    seed_everything(t.seed)  # same on every rank: identical LoRA init without a broadcast
    commcount.install(dist.rank)  # only with ORCHESTRATOR_COMM_LOG set (planner checks)
    strategy = build_strategy(cfg.strategy, dist, compute_dtype)
    set_phase("model loading (tokenizer, base weights, quantization, LoRA)")
    tokenizer = load_tokenizer(cfg.model)
    model = strategy.load_model(cfg.model, cfg.quant, cfg.lora)
    base_storage = base_linear_storage(model)  # before any sharding
    loss_fn, loss_kind = build_loss(t.loss, model, announce=dist.is_main)  # before the strategy wraps
    trainable, total = count_parameters(model)
    return _Model(strategy, model, tokenizer, compute_dtype,
                  functools.partial(compute_autocast, dist.device.type, compute_dtype),
                  loss_fn, loss_kind, base_storage, trainable, total)


def _train_step(m: _Model, batches: Batches, step: int, dist: DistInfo, cfg: RunConfig) -> _Step:
    """Forward and backward over this rank's micro-batches, then the optimizer step. The loss is
    the mean over every labelled token of the global batch (see the module docstring)."""
    strategy = m.strategy
    set_phase(f"step {step} forward/backward (gradient all-reduce)")
    micro = batches.micro_batches(step)
    local_targets = sum(int((b.tensors["labels"][:, 1:] != -100).sum()) for b in micro)
    local_tokens = sum(int(b.tensors["token_mask"].sum()) for b in micro)
    local_positions = sum(b.tensors["input_ids"].numel() for b in micro)
    global_targets, global_tokens, global_positions = all_reduce_sum(
        [local_targets, local_tokens, local_positions], dist.device)
    scale = dist.world_size / max(global_targets, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for j, (seed, tensors) in enumerate(micro):
        torch.manual_seed(seed)  # dropout's masks follow the examples (data/batches.py)
        # token_mask only counts tokens (above, on the host); it stays off the device
        b = {k: v.to(dist.device, non_blocking=True) for k, v in tensors.items() if k != "token_mask"}
        with strategy.accumulate(sync=j == len(micro) - 1):
            with m.autocast():
                loss = m.loss_fn(strategy.train_module, model_inputs(b), b["labels"])
                if faults.armed("nan_loss", step, dist.rank):
                    loss = loss * float("nan")
            strategy.backward(loss * scale)
        loss_sum += loss.detach().double()
    lr = strategy.lr
    set_phase(f"step {step} optimizer step (grad-norm all-reduce)")
    grad_norm = strategy.step(cfg.trainer.max_grad_norm)
    set_phase(f"step {step} loss all-reduce")
    (loss_total,) = all_reduce_sum([float(loss_sum)], dist.device)
    return _Step(loss_total / max(global_targets, 1.0), grad_norm, lr, local_tokens, global_tokens,
                 global_positions)


def _step_metrics(s: _Step, batches: Batches, step: int, dist: DistInfo, flops: tuple) -> dict[str, Any]:
    """What is logged for a step; gathers every rank's tokens/s and peak memory (a collective)."""
    per_rank = all_gather_floats([s.local_tokens / s.seconds, peak_memory_mb(dist.device)], dist.device)
    metrics = {
        "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
        "tokens_per_s": s.global_tokens / s.seconds,
        "tokens_per_s_per_rank": [round(r[0], 1) for r in per_rank],
        "non_pad_share": s.global_tokens / s.global_positions,
        "step_time_s": s.seconds,
        "peak_memory_mb": [round(r[1], 1) for r in per_rank],
    }
    if hasattr(batches.sampler, "row_fill"):  # packed: tokens / (rows x max_seq_len), global batch
        metrics["row_fill"] = batches.sampler.row_fill(step - 1)
    if not s.finite:
        metrics["skipped"] = True
    flops_per_token, peak = flops
    if peak is not None:
        metrics["mfu"] = s.global_tokens / s.seconds * flops_per_token / (peak * dist.world_size)
    return metrics


def _nonfinite(s: _Step, step: int, skipped: int, cfg: RunConfig, run_dir: Path, dist: DistInfo) -> int:
    """A non-finite loss or gradient norm: stop (keeping the last good checkpoint) or count the
    skipped update, per trainer.on_nonfinite; returns the skipped count."""
    what = "loss" if not math.isfinite(s.loss) else "gradient norm"
    if cfg.trainer.on_nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite {what} at step {step} (loss={s.loss}, grad_norm={s.grad_norm}); "
            f"stopped, the last good checkpoint is kept ({checkpoint.latest(run_dir)})")
    if dist.is_main:
        log.warning("non-finite %s at step %d: update skipped (%d so far)", what, step, skipped + 1)
    return skipped + 1


def _run(cfg: RunConfig, run_dir: Path, dist: DistInfo) -> RunResult:
    t = cfg.trainer
    m = _load_model(cfg, dist)
    strategy, model = m.strategy, m.model

    set_phase("data loading (rank 0 tokenizes or reads the cache, the others wait)")
    splits = load_splits(cfg.data, m.tokenizer, dist.is_main, broadcast_object)
    eval_examples = splits.eval
    accum = accumulation_steps(cfg, dist.world_size)
    planned_mb = planned_peak_mb(cfg, dist, m.compute_dtype, splits)
    batches = build_batches(cfg, splits.train, splits.fingerprint, dist.world_size, dist.rank,
                            m.tokenizer.pad_token_id, announce=dist.is_main)
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * batches.steps_per_epoch
    set_phase("strategy setup (wrapping the model, building the optimizer)")
    strategy.setup(model, cfg.optim, total_steps, BatchPlan(t.micro_batch_size, accum, t.max_grad_norm))
    # Start-up peak per rank (model loaded, quantized and sharded): what low-memory loading saves.
    load_peaks = all_gather_object(round(peak_memory_mb(dist.device), 1))

    state, start_step, origin = _starting_point(cfg, run_dir, strategy, batches.sampler, dist, total_steps)

    set_phase("logger start-up (W&B on rank 0)")
    logger = build_logger(cfg, run_dir, dist.is_main, total_steps, start_step,
                          run_config=run_record(cfg, run_dir, dist, strategy.name))
    # MFU estimate: a frozen base costs ~2N FLOPs per token forward and ~2N backward (input
    # gradients only), plus another forward under activation checkpointing.
    flops = ((6 if cfg.model.gradient_checkpointing else 4) * m.total, peak_flops(dist.device))
    holdings: list[dict] = []
    if dist.is_main:
        for line in describe(splits):
            log.info("%s%s", line, " (tokenized cache " + ("hit" if splits.cache_hit else "written") + ")")
        log.info(
            "strategy=%s world=%d device=%s precision=%s quant=%s accumulation=%d steps=%d "
            "trainable=%d/%d params loss=%s%s", strategy.name, dist.world_size, dist.device,
            str(m.compute_dtype).replace("torch.", ""), cfg.quant.method, accum, total_steps,
            m.trainable, m.total, m.loss_kind, origin,
        )

    evaluate = functools.partial(evaluate_run, strategy, eval_examples, m.tokenizer, cfg, dist, m.autocast, m.loss_fn)
    if "eval_before" not in state and eval_examples:
        state["eval_before"] = evaluate()
        logger.log(0, state["eval_before"])

    forward_dtype = ForwardDtypeProbe(model)  # the first training forward's, not evaluation's
    stop = StopRequest(run_dir, dist.device, t.save_every_minutes)
    if dist.is_main:
        rundir.write_state(run_dir, "running", step=start_step)
    skipped = state.get("skipped_steps", 0)
    model.train()
    losses: list[float] = []
    tokens_seen = state.get("tokens_seen", 0.0)
    train_time = state.get("train_time_s", 0.0)
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        faults.at_step_start(step, dist.rank, run_dir)  # test hooks: pace, wait, hang
        s = _train_step(m, batches, step, dist, cfg)
        if not s.finite:
            skipped = _nonfinite(s, step, skipped, cfg, run_dir, dist)
        set_phase(f"step {step} metrics gather")
        s.seconds = time.perf_counter() - t0
        if not holdings:  # after the first step, when the optimizer state exists
            holdings = report_holdings(strategy)
        train_time += s.seconds
        tokens_seen += s.global_tokens
        state["skipped_steps"] = skipped
        if s.finite:
            losses.append(s.loss)
            state.setdefault("train_loss_first", s.loss)
        is_last = step == total_steps
        if step % cfg.logger.every_n_steps == 0 or is_last:
            logger.log(step, _step_metrics(s, batches, step, dist, flops))
        if t.eval_every and step % t.eval_every == 0 and not is_last and eval_examples:
            logger.log(step, evaluate())
        set_phase(f"step {step} stop-request check (all-reduce)")
        periodic = bool(t.save_every) and step % t.save_every == 0 and not is_last
        stopping, timed = (False, False) if is_last else stop.at_boundary(dist.is_main)
        if periodic or timed or stopping:
            state.update(tokens_seen=tokens_seen, train_time_s=train_time, train_loss_last=s.loss,
                         sampler=batches.sampler.state_dict(step))
            saved = _write(logger, checkpoint.save, run_dir, step, strategy, dist, state,
                           t.keep_last_n)
            stop.saved()
        if stopping:
            if dist.is_main:
                rundir.write_state(run_dir, "stopped", step=step, checkpoint=str(saved),
                                   reason=stop.reason, exit_code=stop.exit_code)
                log.info("stop requested (%s): checkpoint saved at step %d; the run resumes from it "
                         "when started again with run.dir=%s", stop.reason, step, run_dir)
            logger.close()
            return RunResult(summary={"stopped_at_step": step}, model=model, losses=losses,
                             stopped=True)

    after = evaluate(run_dir / "eval_samples.jsonl") if eval_examples else {}
    if after:
        logger.log(step, after)
    state.update(tokens_seen=tokens_seen, train_time_s=train_time, sampler=batches.sampler.state_dict(step),
                 train_loss_last=losses[-1] if losses else state.get("train_loss_last"))
    if step > start_step:
        _write(logger, checkpoint.save, run_dir, step, strategy, dist, state, t.keep_last_n)
    set_phase("adapter export")
    _write(logger, checkpoint.export_adapter, run_dir, strategy, dist, step)
    peaks = all_gather_object(round(peak_memory_mb(dist.device), 1))
    precision = str(m.compute_dtype).replace("torch.", "")
    if dist.is_main:
        log_memory(planned_mb, peaks)
        if forward_dtype.dtype not in (None, precision):
            log.warning("the adapters computed in %s, not %s: the strategy's forward did not run "
                        "under the compute dtype's autocast", forward_dtype.dtype, precision)
    summary = _summary(cfg, m, dist, state, after, step, precision, forward_dtype.dtype, peaks,
                       planned_mb, load_peaks, holdings, splits, batches, tokens_seen, train_time,
                       skipped)
    if dist.is_main:
        rundir.write_bookkeeping(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n",
                                 "the run's summary (summary.json)")
        rundir.write_state(run_dir, "finished", step=step)
    set_phase("logger finish (W&B upload on rank 0)")
    logger.close()  # after the results are on disk: a slow upload must not hold them back
    return RunResult(summary=summary, model=model, losses=losses)


def _summary(cfg: RunConfig, m: _Model, dist: DistInfo, state: dict, after: dict, step: int,
             precision: str, forward_dtype: str | None, peaks: list, planned_mb: float | None,
             load_peaks: list, holdings: list, splits, batches: Batches, tokens_seen: float,
             train_time: float, skipped: int) -> dict[str, Any]:
    before = state.get("eval_before", {})
    return {
        "steps": step,
        "world_size": dist.world_size,
        "strategy": m.strategy.name,
        "device": dist.device.type,
        "precision": precision,
        "forward_dtype": forward_dtype,  # what the adapters computed in (None: no step ran)
        "trainable_params": m.trainable,
        "total_params": m.total,
        "train_loss_first": state.get("train_loss_first"),
        "train_loss_last": state.get("train_loss_last"),
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "eval_accuracy_before": before.get("eval_accuracy"),
        "eval_accuracy_after": after.get("eval_accuracy"),
        "tokens_per_s": tokens_seen / train_time if train_time else None,
        "train_time_s": train_time,
        "peak_memory_mb": peaks,
        "planned_peak_memory_mb": [planned_mb] * dist.world_size,
        "host_allocator": hostalloc.active(),  # what the CPU peak and its plan depend on
        "load_peak_memory_mb": load_peaks,
        # CUDA: what the caching allocator reserved at most (an out-of-memory happens there);
        # the plan's allocator reserve is meant to cover the gap to the allocated peak.
        "peak_reserved_memory_mb": (round(torch.cuda.max_memory_reserved(dist.device) / MiB, 1)
                                    if dist.device.type == "cuda" else None),
        "skipped_steps": skipped,
        "holdings_bytes": holdings,
        "base_storage": m.base_storage,
        "loss": m.loss_kind,
        "init_from": cfg.lora.init_from,  # the adapter training started from (None: fresh LoRA)
        "forked_from": state.get("forked_from"),  # the checkpoint, run and step it forked (or None)
        "data": {**splits.stats, "packing": cfg.data.packing, "fingerprint": splits.fingerprint,
                 **batches.sampler.packing_stats()},
        **code_info(),  # version, git commit (None outside a clone) and where the code ran from
    }
