"""Prompt masking, the deterministic sampler, and refusing malformed data with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import ASSETS_DIR, DataConfig, ModelConfig
from orchestrator.data import (
    IGNORE_INDEX, DataError, StepSampler, check_rows, collate, eval_shard, load_examples,
)
from orchestrator.model import load_tokenizer

TINY = str(ASSETS_DIR / "tiny-llama")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path=TINY))


def _write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_labels_mask_prompt_and_padding(tokenizer, tmp_path) -> None:
    rows = [{"instruction": "Reverse the word.", "input": "mango", "output": "ognam"},
            {"instruction": "Add the numbers.", "input": "", "output": "12"}]
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(r) for r in rows]), max_seq_len=128)
    examples = load_examples(cfg.path, tokenizer, cfg)
    batch = collate(examples, tokenizer.pad_token_id)
    for i, (row, ex) in enumerate(zip(rows, examples)):
        prompt_len = len(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
        target = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = batch["labels"][i].tolist()
        n = len(ex.input_ids)
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len           # prompt masked
        assert labels[prompt_len:n] == target                                 # response + EOS kept
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)               # padding masked
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(labels) - n)
    # Without an input the template has no Input section.
    assert "### Input" not in examples[1].prompt


def test_train_on_prompt_keeps_prompt_labels(tokenizer, tmp_path) -> None:
    row = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(row)]), train_on_prompt=True)
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    assert ex.labels == ex.input_ids


def test_sampler_same_global_batch_for_any_world() -> None:
    one = StepSampler(100, global_batch=8, micro_batch=8, world=1, rank=0, seed=3)
    two = [StepSampler(100, global_batch=8, micro_batch=2, world=2, rank=r, seed=3) for r in range(2)]
    for step in range(30):  # crosses epoch boundaries (12 steps per epoch)
        whole = [i for mb in one.micro_batches(step) for i in mb]
        parts = [i for s in two for mb in s.micro_batches(step) for i in mb]
        assert whole == parts
        assert all(len(mb) == 2 for mb in two[0].micro_batches(step))
    epoch0 = [i for s in range(12) for i in one.micro_batches(s)[0]]
    assert len(set(epoch0)) == 96  # no repeats within an epoch


def test_eval_shard_pads_to_equal_length() -> None:
    shards = [eval_shard(5, 2, r) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, None]]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], "data.jsonl:2: invalid JSON"),
        (['{"instruction": "a"}'], "data.jsonl:1: missing field 'output'"),
        (['{"instruction": "a", "output": 3}'], "data.jsonl:1: field 'output' must be a string, got int"),
        (['[1, 2]'], "data.jsonl:1: expected a JSON object, got list"),
        ([''], "data.jsonl: no rows"),
    ],
)
def test_malformed_rows_name_file_line_reason(tmp_path, lines, message) -> None:
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=message):
        check_rows(path, DataConfig(path=path))


def test_malformed_data_refused_by_cli(tmp_path) -> None:
    from conftest import orchestrate

    path = _write(tmp_path, ['{"instruction": "a", "output": "b"}', "not json"])
    proc = orchestrate("train", f"data.path={path}", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data.path: {path}:2: invalid JSON (Expecting value)"
    assert not (tmp_path / "run").exists()
