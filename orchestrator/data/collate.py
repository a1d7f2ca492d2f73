"""Micro-batches as tensors: right-padded rows, or packed rows.

Packed rows carry ``position_ids`` that restart at 0 for every example and no
``attention_mask``: transformers then builds a block-diagonal causal mask from the position ids
(sdpa and eager) or runs variable-length flash attention (flash_attention_2), so no token
attends across an example boundary. Each example's first label is masked, because in a packed
row it would be predicted from the previous example's last token; unpacked, the shift drops it.
Hence the loss and the labelled-token count of a micro-batch are the same packed or not.

``token_mask`` marks real (non-padding) tokens in both layouts, for throughput accounting; it
is not a model input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .tokenize import IGNORE_INDEX, Example

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def collate(examples: Sequence[Example], pad_id: int, weights: Optional[list[bool]] = None) -> dict:
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_mask": mask}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, no row longer than ``capacity``.

    Deterministic (ties keep input order), so every run packs a micro-batch the same way.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(examples: Sequence[Example], pad_id: int, capacity: int) -> dict:
    """Pack the examples into as few rows of at most ``capacity`` tokens as first-fit allows."""
    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    return collate_rows([[examples[i] for i in row] for row in rows], pad_id)


def collate_rows(rows: Sequence[Sequence[Example]], pad_id: int) -> dict:
    """One tensor row per list of examples, laid end to end (see the module docstring)."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    # Padding after the last example counts as one more sequence (positions restart at 0):
    # causal masking keeps every real token from seeing it, and its labels are masked.
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "token_mask": mask}


def model_inputs(batch: dict) -> dict:
    """The keys of a collated batch that the model takes."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}
