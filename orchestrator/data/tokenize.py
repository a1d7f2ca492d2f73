"""Formatted rows -> token ids and labels (-100 on prompt tokens), then the length policy.

Rows are tokenized in batches (one call into the Rust tokenizer per batch, not per segment).
A chat conversation is tokenized once, as a whole, and its trained spans become token ranges
through the character offsets; alpaca and text rows tokenize prompt and response apart.

Over-long examples (data.truncation): ``right`` keeps the start, and for chat first tries to
end at the last whole assistant turn that fits; ``left`` keeps the end; ``drop`` drops them;
``error`` stops at the first one. Under right and left an example left with no trained token
is dropped: a long prompt in one row of thousands must not end the run. Drops are counted and
the first few quoted in the run's data line and summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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


@dataclass
class Tokenized:
    """One example before the length policy: the token range of each trained segment."""

    ids: list[int]
    labels: list[int]
    turns: list[tuple[int, int]]  # (start, end) per trained segment, a following EOS included
    segment_of_turn: list[int]
    eos: int


def _encode(tokenizer, texts: list[str], special: bool) -> list:
    """The Rust tokenizer's encodings of a batch, unpadded and uncut. The wrapper may have left
    padding or truncation on in it (a batch would come back padded, or cut at
    model_max_length); it sets its own again on its next call."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    return backend.encode_batch(texts, add_special_tokens=special)


def _first_token_from(enc, char: int, n_chars: int) -> int:
    """Index of the first token that starts at or after ``char``."""
    while char < n_chars:
        t = enc.char_to_token(char)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= char else t + 1
        char += 1
    return _end_token(enc, n_chars)


def _end_token(enc, end: int) -> int:
    """One past the last token that starts before ``end``."""
    char = end - 1
    while char >= 0:
        t = enc.char_to_token(char)
        if t is not None:
            return t + 1
        char -= 1
    return 0


def _whole(f: Formatted, text: str, enc, tokenizer, cfg: DataConfig) -> Tokenized:
    n_chars = len(text)
    ids = list(enc.ids)
    labels = list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(ids)
    turns, seg_of = [], []
    at = 0
    for k, (text, trained) in enumerate(f.segments):
        if trained:
            a = _first_token_from(enc, at, n_chars)
            b = max(a, _end_token(enc, at + len(text)))
            labels[a:b] = ids[a:b]
            turns.append((a, b))
            seg_of.append(k)
        at += len(text)
    if f.eos_after_target:
        j = seg_of.index(f.target_index)
        a, b = turns[j]
        ids.insert(b, tokenizer.eos_token_id)
        labels.insert(b, tokenizer.eos_token_id)
        turns = [(s + (s >= b), e + (e >= b)) for s, e in turns]
        turns[j] = (a, b + 1)
    return Tokenized(ids, labels, turns, seg_of, tokenizer.eos_token_id)


def _by_segment(f: Formatted, pieces: list[list[int]], tokenizer, cfg: DataConfig) -> Tokenized:
    ids: list[int] = []
    labels: list[int] = []
    turns, seg_of = [], []
    for k, ((_, trained), t) in enumerate(zip(f.segments, pieces)):
        start = len(ids)
        ids += t
        labels += t if trained or cfg.train_on_prompt else [IGNORE_INDEX] * len(t)
        if k == f.target_index and f.eos_after_target:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        if trained:
            turns.append((start, len(ids)))
            seg_of.append(k)
    return Tokenized(ids, labels, turns, seg_of, tokenizer.eos_token_id)


def tokenize_batch(rows: Sequence[Formatted], tokenizer, cfg: DataConfig) -> list[Tokenized]:
    """Every row, with as few calls into the tokenizer as the rows' kinds allow."""
    has_offsets = getattr(tokenizer, "backend_tokenizer", None) is not None
    out: list[Optional[Tokenized]] = [None] * len(rows)
    whole = [i for i, f in enumerate(rows) if f.whole and has_offsets]
    for special in (True, False):
        group = [i for i in whole if rows[i].add_special_tokens == special]
        texts = ["".join(t for t, _ in rows[i].segments) for i in group]
        for i, text, enc in zip(group, texts, _encode(tokenizer, texts, special)):
            out[i] = _whole(rows[i], text, enc, tokenizer, cfg)
    rest = [i for i in range(len(rows)) if out[i] is None]
    if rest:
        firsts = [(i, k) for i in rest for k in range(len(rows[i].segments)) if k == 0 and rows[i].add_special_tokens]
        others = [(i, k) for i in rest for k in range(len(rows[i].segments)) if not (k == 0 and rows[i].add_special_tokens)]
        pieces: dict[tuple[int, int], list[int]] = {}
        for special, keys in ((True, firsts), (False, others)):
            texts = [rows[i].segments[k][0] for i, k in keys]
            if has_offsets:
                encoded = [e.ids for e in _encode(tokenizer, texts, special)]
            else:
                encoded = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
            pieces.update(zip(keys, encoded))
        for i in rest:
            out[i] = _by_segment(rows[i], [pieces[(i, k)] for k in range(len(rows[i].segments))], tokenizer, cfg)
    return out  # type: ignore[return-value]


@dataclass
class Fitted:
    """An example that fits: its ids and labels, where its prompt ends, and its answer."""

    ids: list[int]
    labels: list[int]
    prompt_len: int
    target: str
    target_segment: int  # segments before it are the prompt text
    truncated: bool


def fit(f: Formatted, t: Tokenized, cfg: DataConfig, where: str) -> tuple[Optional[Fitted], str]:
    """The example under data.truncation, or (None, why it was dropped)."""
    ids, labels, limit = t.ids, t.labels, cfg.max_seq_len
    j = t.segment_of_turn.index(f.target_index)
    prompt_len, target, segment = t.turns[j][0], f.target, f.target_index
    n = len(ids)
    if n <= limit:
        return Fitted(ids, labels, prompt_len, target, segment, False), ""
    if cfg.truncation == "error":
        raise LengthError(f"{where}: {n} tokens, longer than data.max_seq_len={limit} (data.truncation=error; "
                          "data.truncation=right keeps what fits)")
    if cfg.truncation == "drop":
        return None, f"{where}: {n} tokens > data.max_seq_len={limit}"
    if cfg.truncation == "left":
        cut = n - limit
        ids, labels, prompt_len = ids[cut:], labels[cut:], max(prompt_len - cut, 0)
    else:
        eos = [f.eos_after_target and k != j for k in range(len(t.turns))]  # EOS to add after turn k
        whole = [k for k, (_, end) in enumerate(t.turns) if end + eos[k] <= limit] if f.whole else []
        if whole:  # end at the last whole assistant turn that fits
            k = whole[-1]
            a, b = t.turns[k]
            ids, labels = ids[:b] + [t.eos] * eos[k], labels[:b] + [t.eos] * eos[k]
            segment, prompt_len, target = t.segment_of_turn[k], a, f.targets[k]
        else:
            ids, labels, prompt_len = ids[:limit], labels[:limit], min(prompt_len, limit)
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, f"{where}: {n} tokens; no trained token fits in data.max_seq_len={limit}"
    return Fitted(ids, labels, prompt_len, target, segment, True), ""


def example(f: Formatted, fitted: Fitted) -> Example:
    prompt = "".join(text for text, _ in f.segments[: fitted.target_segment])
    return Example(input_ids=fitted.ids, labels=fitted.labels, prompt_ids=fitted.ids[: fitted.prompt_len],
                   target=fitted.target, prompt=prompt)
