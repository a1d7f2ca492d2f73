"""Each strategy on the same model, data and steps, in one invocation; a table relative to DDP.

    python benchmarks/strategies.py [--steps 30] [--nproc 2] [extra overrides ...]

Step time is the median over steps after the first few (warm-up excluded); memory is the
peak per rank (CUDA allocator peak on GPU, process RSS on CPU); base bytes are the 4-bit base
each rank holds locally.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import steady_medians, train, train_steps

STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "fsdp shard_base": ["strategy=fsdp", "strategy.shard_base=true"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3"],
}


def run_one(name: str, overrides: list[str], steps: int, nproc: int, extra: list[str], root: Path) -> dict:
    out = train(root / name.replace(" ", "_"), [
        f"trainer.max_steps={steps}", f"launcher.nproc_per_node={nproc}",
        "trainer.eval_generate_examples=0", *overrides, *extra])
    if "error" in out:
        return {"name": name, "error": out["error"]}
    train_metrics = train_steps(out)
    summary = out["summary"]
    return {
        "name": name,
        **steady_medians(train_metrics, warmup=5),
        "peak_mb": max(summary["peak_memory_mb"]),
        "base_mb": max(h["base_bytes"] for h in summary["holdings_bytes"]) / 2**20,
        "final_loss": train_metrics[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. model.path=...")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(n, o, args.steps, args.nproc, args.extra, Path(tmp)) for n, o in STRATEGIES.items()]
    ref = next((r for r in rows if r["name"] == "ddp" and "error" not in r), None)
    print(f"| strategy | step time s | tokens/s | vs DDP | peak MB/rank | vs DDP | base MB/rank | vs DDP | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        rel = lambda k: f"{r[k] / ref[k]:.2f}x" if ref else "-"
        print(f"| {r['name']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {rel('tokens_per_s')} | "
              f"{r['peak_mb']:.0f} | {rel('peak_mb')} | {r['base_mb']:.2f} | {rel('base_mb')} | {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
