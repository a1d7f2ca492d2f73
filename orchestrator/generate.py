"""Talk to a trained run: the run's base in 4-bit with its adapter (or a merged export), prompts
formatted exactly as training formatted them, greedy or sampled completions.

"Exactly as training" means the prompt goes through the run's own data path (``format_row`` then
``tokenize`` with the frozen ``config.yaml``'s data settings), and the ids generation starts from
are the ``prompt_ids`` that exact-match evaluation starts from. Formatting a prompt by hand here
(an alpaca template, a chat template call) would drift from training the first time either
changes; a model asked in a format it was not trained on answers worse, and the user cannot tell
why.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import RunConfig

Message = dict  # {"role": ..., "content": ...}


class GenerateError(ValueError):
    """A user-fixable problem (no such run, no adapter, a prompt that cannot fit)."""


@dataclass
class Sampling:
    """Greedy by default (temperature 0): the same decoding as exact-match evaluation."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise GenerateError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise GenerateError(f"top_k={self.top_k} must be >= 0 (0: off)")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k or None}


def run_config(run_dir: Path) -> RunConfig:
    from .rundir import NotARunDir, frozen_config

    try:
        return frozen_config(run_dir)
    except NotARunDir as exc:
        raise GenerateError(f"run_dir={exc}") from None


class Chat:
    """A loaded model and the run's prompt formatting. ``complete`` answers a prompt (alpaca:
    the instruction; chat: the next user turn after ``history``; text: text to continue)."""

    def __init__(self, run_dir: Path, merged: Optional[Path] = None,
                 device: Optional[torch.device] = None):
        from .distributed import resolve_precision
        from .model import compute_autocast, contiguous_head_input, disable_cpu_repacking, load_tokenizer, load_with_adapter

        self.cfg = run_config(run_dir)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_precision(self.cfg.trainer.precision, self.device)
        if merged is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not (merged / "config.json").exists():
                raise GenerateError(f"merged={merged}: no config.json; make one with orchestrate merge")
            self.model = AutoModelForCausalLM.from_pretrained(str(merged), device_map={"": self.device})
            contiguous_head_input(self.model)
            self.tokenizer = AutoTokenizer.from_pretrained(str(merged))
        else:
            adapter = run_dir / "adapter"
            if not (adapter / "adapter_config.json").exists():
                raise GenerateError(f"{adapter}: no PEFT adapter yet; has the run finished? "
                                    "(a stopped run saves one when it finishes)")
            self.model = load_with_adapter(self.cfg.model, self.cfg.quant, str(adapter), dtype,
                                           self.device)
            disable_cpu_repacking(self.model)
            self.tokenizer = load_tokenizer(self.cfg.model)
        self.model.eval()
        self.autocast = functools.partial(compute_autocast, self.device.type, dtype)

    @property
    def data_cfg(self):
        """The data settings prompts are formatted with: data.*, or for a mixture its first
        source's (the first listed is the recipe's main one; its format, fields and template)."""
        from .config.data import source_config

        return source_config(self.cfg.data, 0) if self.cfg.data.sources else self.cfg.data

    def prompt_ids(self, row: dict, where: str = "prompt") -> list[int]:
        """The ids generation starts from, built by the run's own data path from a row in the
        run's format (``prompt_row`` makes one from typed text)."""
        from .data import DataError, prepare_prompt

        try:
            return prepare_prompt(self.data_cfg, self.tokenizer, row, where)
        except DataError as exc:
            raise GenerateError(str(exc)) from None

    def row(self, prompt: str, input_text: str = "", history: Sequence[Message] = ()) -> dict:
        from .data import prompt_row

        return prompt_row(self.data_cfg, prompt, input_text, list(history))

    @torch.no_grad()
    def complete_ids(self, batch: Sequence[Sequence[int]], sampling: Sampling) -> list[str]:
        """Completions of several prompts, left-padded into one batch as evaluation does."""
        from .evaluate import generate_texts

        sampling.check()
        torch.manual_seed(sampling.seed)
        return generate_texts(self.model, batch, self.tokenizer, self.device, self.autocast,
                              max_new_tokens=sampling.max_new_tokens, **sampling.generate_kwargs())

    def complete(self, row: dict, sampling: Sampling) -> str:
        return self.complete_ids([self.prompt_ids(row)], sampling)[0]

    def complete_many(self, rows: Sequence[dict], sampling: Sampling, batch_size: int = 8) -> list[str]:
        """Completions of many rows, in batches of ``batch_size``."""
        ids = [self.prompt_ids(r, f"prompt {i + 1}") for i, r in enumerate(rows)]
        out: list[str] = []
        for i in range(0, len(ids), batch_size):
            out += self.complete_ids(ids[i: i + batch_size], sampling)
        return out
