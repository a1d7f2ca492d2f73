"""Read a W&B offline run file (``run-<id>.wandb``) back, for tests.

wandb 0.31 writes it from its Go service and ships no Python reader (FACTS.md). The file is a
LevelDB-style log: a 7-byte header (``:W&B``, 0xBEE1, version 0), then 32 KiB blocks of chunks,
each a 4-byte crc32, a 2-byte length and a 1-byte type (1 full, 2 first, 3 middle, 4 last);
the payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    pos = HEADER
    pending = b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if kind == 0 and length == 0:
            pos += left
            continue
        want = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        assert crc == want, f"bad crc at offset {pos}"
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_history(path: Path) -> list[dict]:
    """Each logged row as {key: value}, with ``_step`` as logged."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def read_config(path: Path) -> dict:
    config: dict = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        items = []
        if kind == "config":
            items = record.config.update
        elif kind == "run":
            items = record.run.config.update
        for item in items:
            key = item.key or "/".join(item.nested_key)
            config[key] = json.loads(item.value_json)
    return config


def run_ids(path: Path) -> set[str]:
    return {r.run.run_id for r in read_records(path) if r.WhichOneof("record_type") == "run"}


def run_groups(path: Path) -> set[str]:
    return {r.run.run_group for r in read_records(path) if r.WhichOneof("record_type") == "run"}
