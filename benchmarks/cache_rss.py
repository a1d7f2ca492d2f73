"""What opening a prepared cache entry costs the launcher, by kind of memory.

    python benchmarks/cache_rss.py [--rows 100000 1000000] [--dir /tmp/cache_rss]

Writes a synthetic train split like the pipeline's (Arrow stream, 512-row record batches,
50-250 tokens per row) with ``SplitWriter``, then in a fresh process opens it the way every
run does (``cache._load_split``: ``datasets.Dataset.from_file``, memory-mapped) and reads the
length column, printing the process's resident memory split into anonymous (its own) and
file-backed (mapped pages of the entry: clean page cache, shared by the ranks and reclaimable).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def memory() -> dict[str, int]:
    """MB resident now, anonymous and file-backed, from /proc/self/status."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def write(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa

    from orchestrator.data.cache import SplitWriter, schema

    writer, rng = SplitWriter(path), np.random.default_rng(0)
    for start in range(0, rows, 512):
        k = min(512, rows - start)
        lengths = rng.integers(50, 250, k).astype(np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 150_000, int(lengths.sum())).astype(np.int32)))
        writer.write(pa.RecordBatch.from_arrays(
            [ids, ids, pa.array(lengths), pa.array(lengths // 2), pa.array(["t"] * k), pa.array(["p"] * k)],
            schema=schema()))
    writer.close()


def read(path: Path) -> None:
    from orchestrator.data.cache import _load_split

    before = memory()
    split = _load_split(path)
    split.lengths()
    after = memory()
    print(" | ".join(f"+{after[k] - before[k]}" for k in ("VmRSS", "RssAnon", "RssFile")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cache_rss"))
    ap.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        read(args.read)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    print("| rows | file MB | RSS MB | anonymous MB | file-backed MB |")
    print("| --- | --- | --- | --- | --- |")
    for rows in args.rows:
        path = args.dir / f"train-{rows}.arrow"
        if not path.exists():
            write(path, rows)
        out = subprocess.run([sys.executable, __file__, "--read", str(path)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        print(f"| {rows} | {path.stat().st_size >> 20} | {out} |")


if __name__ == "__main__":
    main()
