"""Token-budget batching (orchestrator/data/budget.py): rows filled best-fit-decreasing over the
global batch or the whole set, every example once, ranks in step, exact resume; and the packed
rows give the loss of the examples run one by one."""

from __future__ import annotations

import random

import pytest
import torch

from orchestrator.config import ASSETS_DIR, DataConfig, LoraConfig, ModelConfig, QuantConfig
from orchestrator.data import PackedRowSampler, TokenBudgetSampler, collate, collate_rows, load_examples
from orchestrator.data.budget import best_fit_decreasing, plan_step
from orchestrator.data.sources import DataError
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


def test_best_fit_places_each_example_in_the_fullest_row_it_fits() -> None:
    # 9 opens row 0 (free 1), 6 row 1 (free 4), 5 row 2 (free 5); 4 goes to row 1 (the tightest
    # fit, not row 2), 3 to row 2 (free 2), 2 fills row 2, 1 fills row 0.
    assert best_fit_decreasing([5, 9, 3, 6, 4, 1, 2], 10) == [[1, 5], [3, 4], [0, 2, 6]]
    assert best_fit_decreasing([4, 4, 4], 10) == [[0, 1], [2]]  # ties: the lowest row


def test_dataset_packing_fills_rows_and_resumes_exactly() -> None:
    """data.packing_scope=dataset: ~98% full rows, every example once per epoch, the same rows
    on one rank with micro-batch 2B as on two ranks with B, refusal of a step-scoped position."""
    rng = random.Random(1)
    lengths = [min(256, max(8, int(rng.lognormvariate(4.6, 0.6)))) for _ in range(2000)]
    make = lambda world, micro, r: PackedRowSampler(8, micro, world, r, 5, lengths, 256, "fp")  # noqa: E731
    a, b, one = make(2, 2, 0), make(2, 2, 1), make(1, 4, 0)
    assert a.fill >= 0.97 and sum(lengths) == a.fill * len(a.rows) * 256
    assert all(sum(lengths[i] for i in row) <= 256 for row in a.rows)  # no row over its capacity
    assert sorted(i for row in a.rows for i in row) == list(range(len(lengths)))  # each example once
    epoch = [i for step in range(a.steps_per_epoch) for s in (a, b) for mb in s.micro_batches(step)
             for row in mb for i in row]
    dropped = len(a.rows) % 8  # the incomplete last global batch of rows
    assert len(epoch) == len(set(epoch)) >= len(lengths) - dropped * max(len(r) for r in a.rows)
    for step in (0, 3, a.steps_per_epoch + 2):  # the second epoch reshuffles the same rows
        two = [row for s in (a, b) for mb in s.micro_batches(step) for row in mb]
        assert two == [row for mb in one.micro_batches(step) for row in mb]
        assert all(len(mb) == 2 for mb in a.micro_batches(step))
        assert a.row_fill(step) >= 0.9
    assert a.micro_batches(a.steps_per_epoch) != a.micro_batches(0)
    a.load_state_dict(make(2, 2, 1).state_dict(7), 7)
    stepwise = TokenBudgetSampler(len(a.rows), 8, 2, 2, 0, 5, lengths, 256, "fp").state_dict(7)
    with pytest.raises(DataError, match="unit: 'examples' then, 'rows' now"):
        a.load_state_dict(stepwise, 7)
    with pytest.raises(DataError, match="packs into 1 rows .* fewer than trainer.global_batch_size=8"):
        PackedRowSampler(8, 2, 2, 0, 5, [10, 20], 256)


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
