"""Token-budget batching (orchestrator/data/budget.py): rows filled best-fit-decreasing over the
global batch, every example once, ranks in step; and the packed rows give the loss of the
examples run one by one."""

from __future__ import annotations

import random

import torch

from orchestrator.config import ASSETS_DIR, DataConfig, LoraConfig, ModelConfig, QuantConfig
from orchestrator.data import TokenBudgetSampler, collate, collate_rows, load_examples
from orchestrator.data.budget import plan_step
from orchestrator.loss import build_loss, plain_loss
from orchestrator.model import attach_lora, load_base, load_tokenizer
from orchestrator.tiny.random_llama import TINY


def test_plan_covers_every_example_once_and_fills_rows() -> None:
    rng = random.Random(0)
    for world, micro, n in ((2, 2, 64), (2, 1, 6), (1, 4, 32), (4, 2, 24)):
        lengths = [min(256, max(8, int(rng.lognormvariate(4.6, 0.6)))) for _ in range(n)]
        plans = [plan_step(lengths, 256, micro, world, r) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # the same micro-steps on every rank
        rows = [row for p in plans for mb in p for row in mb]
        assert all(1 <= len(mb) <= micro for p in plans for mb in p)
        assert sorted(i for row in rows for i in row) == list(range(n))
        assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
        if n == 64:  # a realistic spread over a real global batch: rows >= 95% full
            assert sum(lengths) / (len(rows) * 256) >= 0.95


def test_sampler_is_a_pure_function_of_the_step() -> None:
    lengths = [random.Random(i).randint(10, 200) for i in range(100)]
    make = lambda r: TokenBudgetSampler(100, 16, 2, 2, r, 3, lengths, 256)  # noqa: E731
    a, b = make(0), make(1)
    for step in (0, 5, 7, 6, 30):
        seen = [i for s in (a, b) for mb in s.micro_batches(step) for row in mb for i in row]
        assert sorted(seen) == sorted(a.global_batch_indices(step))
        assert make(0).micro_batches(step) == a.micro_batches(step)


def test_budget_rows_give_the_one_by_one_loss() -> None:
    """The 4-bit QLoRA model (fp32) on a rank's packed micro-batches, through the chunked loss:
    the token-loss sum equals the examples run one at a time through the plain loss."""
    tok = load_tokenizer(ModelConfig(path=str(TINY)))
    cfg = DataConfig(path="unused", max_seq_len=256)
    examples = load_examples(str(ASSETS_DIR / "tiny_instruct" / "eval.jsonl"), tok, cfg)[:16]
    model = load_base(ModelConfig(path=str(TINY)), QuantConfig(), torch.float32, torch.device("cpu"))
    model = attach_lora(model, LoraConfig(dropout=0.0)).eval()
    pad = tok.pad_token_id

    def inputs(b: dict) -> dict:
        return {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "position_ids")}

    with torch.no_grad():
        one_by_one = sum(float(plain_loss(model, inputs(b), b["labels"]))
                         for b in (collate([e], pad) for e in examples))
        chunked, _ = build_loss("chunked", model)
        lengths = [len(e.input_ids) for e in examples]
        packed = 0.0
        for rank in range(2):
            for mb in plan_step(lengths, 256, 2, 2, rank):
                b = collate_rows([[examples[i] for i in row] for row in mb], pad)
                packed += float(chunked(model, inputs(b), b["labels"]))
    assert abs(packed - one_by_one) <= 1e-5 * one_by_one, (packed, one_by_one)
