"""A user's prompt -> the ids generation starts from, through the same formatting and
tokenization as training rows (so `orchestrate generate` asks the model in its trained format)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import DataConfig
from .formats import conversation, format_row
from .sources import DataError
from .tokenize import fit, tokenize_batch

# Generation is not bound by the training length; the model's own context limit applies.
_NO_LIMIT = 1 << 30


def prompt_row(cfg: DataConfig, prompt: str, input_text: str = "",
               history: Optional[list[dict]] = None) -> dict:
    """A row in the run's format from a typed prompt. alpaca: the instruction (and its input);
    chat: the next user turn after ``history``; prompt_completion: the plain prompt; text: the
    text to continue."""
    if cfg.format == "alpaca":
        return {cfg.instruction_field: prompt, cfg.input_field: input_text}
    if cfg.format == "chat":
        return {cfg.messages_field: [*(history or []), {"role": "user", "content": prompt}]}
    if cfg.format == "prompt_completion":
        return {cfg.prompt_field: prompt}
    return {cfg.text_field: prompt}


def prepare_prompt(cfg: DataConfig, tokenizer, row: dict, where: str = "prompt") -> list[int]:
    """The ids of a row in the run's format, up to where its response starts. The response is
    replaced by an empty one, so the run's formatter places the boundary exactly where training
    put it (a chat row's trailing assistant turn, if any, is what gets answered again)."""
    if cfg.format == "text":
        text = row.get(cfg.text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: field {cfg.text_field!r} must be a string")
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    row, settings = dict(row), cfg
    if cfg.format == "alpaca":
        row[cfg.output_field] = ""
    elif cfg.format == "prompt_completion":
        conversational = isinstance(row.get(cfg.prompt_field), list)
        row[cfg.completion_field] = [{"role": "assistant", "content": ""}] if conversational else ""
    else:
        messages = conversation(row, cfg, where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        row = {cfg.messages_field: [*messages, {"role": "assistant", "content": ""}]}
        settings = dataclasses.replace(cfg, role_field=None, content_field=None)  # role/content now
    settings = dataclasses.replace(settings, max_seq_len=_NO_LIMIT, train_on_prompt=False, truncation="right")
    formatted = format_row(row, settings, where, tokenizer)
    fitted, _ = fit(formatted, tokenize_batch([formatted], tokenizer, settings)[0], settings, where)
    return list(fitted.ids[: fitted.prompt_len])
