"""Held-out loss and exact-match accuracy, sharded over ranks and summed.

Every rank runs the same number of batches (short shards are padded with examples whose
labels are masked out), because sharded strategies need every rank in every forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from . import rundir
from .config import RunConfig
from .data import Example, collate, eval_shard
from .distributed import DistInfo, all_gather_object, all_reduce_sum, release_free_host_memory, set_phase
from .loss import IGNORE_INDEX, LossFn


def _batches(examples: Sequence[Example], dist: DistInfo, batch_size: int):
    """(examples, which are real rather than padding, their indices in ``examples``)."""
    idx = eval_shard(len(examples), dist.world_size, dist.rank)
    for i in range(0, len(idx), batch_size):
        chunk = idx[i : i + batch_size]
        yield ([examples[j if j is not None else 0] for j in chunk], [j is not None for j in chunk],
               chunk)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], dist: DistInfo, batch_size: int,
              pad_id: int, autocast, loss_fn: LossFn) -> float:
    """Mean next-token loss over the labelled positions, through the training loss function:
    the chunked loss never builds the full logits here either (eval_batch_size x length x a
    151k vocabulary would be gigabytes)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for exs, keep, _ in _batches(examples, dist, batch_size):
        batch = {k: v.to(dist.device) for k, v in collate(exs, pad_id, keep).items()}
        with autocast():
            loss = loss_fn(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                           batch["labels"])
        total += float(loss)
        count += float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    total, count = all_reduce_sum([total, count], dist.device)
    model.train(was_training)
    return total / max(count, 1.0)


@torch.no_grad()
def generate_texts(model: nn.Module, prompts: Sequence[Sequence[int]], tokenizer, device: torch.device,
                   autocast, **generate_kwargs) -> list[str]:
    """Continuations of ``prompts`` (token ids), left-padded into one batch as generation needs,
    each cut at EOS and decoded: exact-match evaluation and ``orchestrate generate`` decode alike."""
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    with autocast():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    texts = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def exact_match(model: nn.Module, examples: Sequence[Example], tokenizer, dist: DistInfo,
                batch_size: int, max_new_tokens: int, synced: bool, autocast,
                samples: Optional[list] = None) -> float:
    """Share of prompts whose greedy continuation (up to EOS, stripped) equals the target.
    ``samples`` (a list) receives this rank's {index, output, match} for each of its prompts."""
    was_training = model.training
    model.eval()
    hits = total = 0.0
    for exs, keep, indices in _batches(examples, dist, batch_size):
        texts = generate_texts(model, [e.prompt_ids for e in exs], tokenizer, dist.device, autocast,
                               max_new_tokens=max_new_tokens, do_sample=False,
                               synced_gpus=synced and dist.world_size > 1)
        for text, e, k, j in zip(texts, exs, keep, indices):
            if not k:
                continue
            hit = text.strip() == e.target.strip()
            hits += float(hit)
            total += 1.0
            if samples is not None:
                samples.append({"index": j, "output": text, "match": hit})
    hits, total = all_reduce_sum([hits, total], dist.device)
    model.train(was_training)
    return hits / max(total, 1.0)


def evaluate_run(strategy, eval_examples, tokenizer, cfg: RunConfig, dist: DistInfo, autocast,
                 loss_fn, samples_path: Optional[Path] = None) -> dict:
    """Eval loss and exact match; with ``samples_path`` (the final evaluation) rank 0 also writes
    every generated answer there, so a user can read what the model said, not just a score.
    Every rank calls it (the metrics are summed over ranks)."""
    t = cfg.trainer
    set_phase("evaluation")
    release_free_host_memory(dist.device)  # training's freed activations, before eval allocates
    out = {"eval_loss": eval_loss(strategy.eval_module, eval_examples, dist, t.eval_batch_size,
                                  tokenizer.pad_token_id, autocast, loss_fn)}
    if t.eval_generate_examples and cfg.data.format != "text":  # raw text has no answers
        subset = eval_examples[: t.eval_generate_examples]
        samples: list[dict] = []
        out["eval_accuracy"] = exact_match(
            strategy.eval_module, subset, tokenizer, dist, t.eval_batch_size,
            t.eval_max_new_tokens, strategy.synced_forward, autocast, samples,
        )
        if samples_path is not None:
            _write_samples(samples_path, subset, all_gather_object(samples), dist)
    return out


def _write_samples(path: Path, examples, per_rank: list[list[dict]], dist: DistInfo) -> None:
    if not dist.is_main:
        return
    rows = sorted((s for rank in per_rank for s in rank), key=lambda s: s["index"])
    text = "".join(json.dumps({"prompt": examples[s["index"]].prompt, "target": examples[s["index"]].target,
                               **s}) + "\n" for s in rows)
    rundir.write_bookkeeping(path, text, "the final evaluation's answers (eval_samples.jsonl)")
