"""Read instruction data, tokenize with prompt masking, and hand each rank its micro-batches.

The sampler is a pure function of (seed, step): the global batch of step s is the same slice of
the same epoch permutation whatever the world size, and each rank takes its contiguous part.
That gives two properties the tests check: a run on one rank with batch 2B sees exactly the
examples of two ranks with batch B, and resuming at step s needs nothing but s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import DataConfig

IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset problem, naming the file, the line and the reason."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str
    target: str


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Rows of a JSONL file with their 1-based line numbers; refuses what is not a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[int, dict]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def format_alpaca(row: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    """(prompt, response) of one Alpaca-style row."""
    def field(name: str, required: bool) -> str:
        value = row.get(name)
        if value is None:
            if required:
                raise DataError(f"{where}: missing field {name!r}")
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        return value

    instruction = field(cfg.instruction_field, True)
    inp = field(cfg.input_field, False)
    output = field(cfg.output_field, True)
    template = cfg.prompt_template if inp else cfg.prompt_template_no_input
    return template.format(instruction=instruction, input=inp), output


def check_rows(path: str, cfg: DataConfig) -> int:
    """Parse and format every row without tokenizing, so bad data is refused before launch."""
    rows = read_jsonl(path)
    for lineno, row in rows:
        format_alpaca(row, cfg, f"{path}:{lineno}")
    return len(rows)


def tokenize_example(prompt: str, target: str, tokenizer, cfg: DataConfig) -> Example:
    """Prompt (with BOS) then response plus EOS; labels are -100 on the prompt unless asked."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[: cfg.max_seq_len]
    prompt_labels = list(prompt_ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + target_ids)[: cfg.max_seq_len]
    return Example(input_ids=input_ids, labels=labels, prompt=prompt, target=target)


def load_examples(path: str, tokenizer, cfg: DataConfig) -> list[Example]:
    examples = []
    for lineno, row in read_jsonl(path):
        prompt, target = format_alpaca(row, cfg, f"{path}:{lineno}")
        ex = tokenize_example(prompt, target, tokenizer, cfg)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            raise DataError(
                f"{path}:{lineno}: the prompt alone fills data.max_seq_len={cfg.max_seq_len}; "
                "no response token is left to train on"
            )
        examples.append(ex)
    return examples


def collate(examples: list[Example], pad_id: int, weights: Optional[list[bool]] = None) -> dict:
    """Right-pad to the longest sequence; examples with weight False keep no labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if weights is None or weights[i]:
            labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class StepSampler:
    """Micro-batch indices for (step, rank), deterministic in the seed.

    Epoch e uses permutation(seed + e); step s's global batch is the s-th slice of it (an
    incomplete last slice is dropped), and rank r takes the r-th contiguous part.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int):
        if n < global_batch:
            raise DataError(
                f"the training set has {n} examples, fewer than trainer.global_batch_size={global_batch}"
            )
        self.n, self.global_batch, self.micro = n, global_batch, micro_batch
        self.world, self.rank, self.seed = world, rank, seed
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        per_rank = self.global_batch // self.world
        local = batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        return [local[j : j + self.micro] for j in range(0, per_rank, self.micro)]


def eval_shard(n: int, world: int, rank: int) -> list[Optional[int]]:
    """This rank's eval indices, padded with None so every rank runs the same number of batches
    (sharded strategies need every rank in every forward)."""
    per_rank = -(-n // world)
    own: list[Optional[int]] = list(range(rank, n, world))
    return own + [None] * (per_rank - len(own))
