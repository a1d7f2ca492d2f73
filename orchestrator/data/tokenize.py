"""Formatted segments -> token ids and labels: -100 on prompt tokens, then the truncation policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import DataConfig
from .formats import Formatted
from .sources import DataError

IGNORE_INDEX = -100


class LengthError(DataError):
    """An example that cannot fit data.max_seq_len (a setting to change, not a malformed row)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # What greedy decoding starts from in exact-match evaluation, and the answer it must give.
    prompt_ids: list[int]
    target: str
    prompt: str = ""


def tokenize(f: Formatted, tokenizer, cfg: DataConfig, where: str) -> tuple[Optional[Example], bool]:
    """(the example or None when it is too long and data.truncation=drop, whether it was cut)."""
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    for k, (text, trained) in enumerate(f.segments):
        if k == f.target_index:
            prompt_len = len(ids)
        t = tokenizer(text, add_special_tokens=f.add_special_tokens and k == 0)["input_ids"]
        ids += t
        labels += t if trained or cfg.train_on_prompt else [IGNORE_INDEX] * len(t)
        if k == f.target_index and f.eos_after_target:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    cut = len(ids) - cfg.max_seq_len
    if cut > 0:
        if cfg.truncation == "drop":
            return None, True
        if cfg.truncation == "left":
            ids, labels, prompt_len = ids[cut:], labels[cut:], max(prompt_len - cut, 0)
        else:
            ids, labels, prompt_len = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len], min(prompt_len, cfg.max_seq_len)
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise LengthError(
            f"{where}: the prompt alone fills data.max_seq_len={cfg.max_seq_len}; "
            "no response token is left to train on"
        )
    prompt = "".join(text for text, _ in f.segments[: f.target_index])
    return Example(input_ids=ids, labels=labels, prompt_ids=ids[:prompt_len], target=f.target,
                   prompt=prompt), cut > 0
