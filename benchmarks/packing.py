"""Packing against padding to the longest in the micro-batch: same model, data and steps.

    python benchmarks/packing.py [--steps 20] [--nproc 2] [extra overrides ...]

The dataset is raw text (data.format=text) cut from the tiny_instruct prose at lognormal lengths
(median ~60 tokens, a long tail clipped at max_seq_len), the spread of real fine-tuning data.
Both runs train on exactly the same examples at every step (the sampler does not depend on
packing), so the difference is the padding work saved. Reported: non-padding tokens per second
(median over steps after warm-up), the share of positions that are real tokens, and the final
loss (equal up to float noise: packing does not change what is learned).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from common import steady_medians, train, train_steps

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "orchestrator" / "assets" / "tiny_instruct" / "train.jsonl"
MAX_LEN = 256


def make_dataset(path: Path, n: int = 2000, seed: int = 0) -> dict:
    """Text rows with lognormal character (= token, for the tiny tokenizer) lengths."""
    rng = random.Random(seed)
    prose = " ".join(
        f"{r['instruction']} {r.get('input', '')} The answer is {r['output']}."
        for r in map(json.loads, TINY.read_text().splitlines())
    )
    lengths = [min(MAX_LEN - 2, max(8, int(rng.lognormvariate(4.1, 0.75)))) for _ in range(n)]
    with path.open("w") as f:
        for length in lengths:
            start = rng.randrange(len(prose) - length)
            f.write(json.dumps({"text": prose[start:start + length]}) + "\n")
    lengths.sort()
    return {"examples": n, "median_len": lengths[n // 2], "p90_len": lengths[int(n * 0.9)],
            "max_len": lengths[-1], "mean_len": sum(lengths) / n}


def run_one(packing: bool, data: Path, steps: int, nproc: int, extra: list[str], root: Path) -> dict:
    out = train(root / ("packed" if packing else "padded"), [
        f"trainer.max_steps={steps}", f"launcher.nproc_per_node={nproc}", "data=jsonl",
        f"data.path={data}", "data.format=text", f"data.max_seq_len={MAX_LEN}",
        f"data.packing={str(packing).lower()}", f"data.cache_dir={root / 'cache'}",
        "trainer.global_batch_size=64", "trainer.micro_batch_size=16",
        "trainer.eval_generate_examples=0", "optim.lr=3e-3", *extra,
    ])
    if "error" in out:
        raise SystemExit(f"packing={packing} failed: {out['error']}")
    steps_logged = train_steps(out)
    return {
        "packing": packing,
        **steady_medians(steps_logged, warmup=3),
        "non_pad_share": statistics.mean(m["non_pad_share"] for m in steps_logged),
        "final_loss": steps_logged[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. model.path=...")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape = make_dataset(root / "spread.jsonl")
        print(f"dataset: {json.dumps(shape)}")
        padded = run_one(False, root / "spread.jsonl", args.steps, args.nproc, args.extra, root)
        packed = run_one(True, root / "spread.jsonl", args.steps, args.nproc, args.extra, root)
    print("| layout | non-pad tokens/s | step time s | real-token share | final loss |")
    print("| --- | --- | --- | --- | --- |")
    for r in (padded, packed):
        print(f"| {'packed' if r['packing'] else 'padded'} | {r['tokens_per_s']:.0f} | "
              f"{r['step_time_s']:.3f} | {r['non_pad_share']:.2f} | {r['final_loss']:.4f} |")
    print(f"packing speed-up: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x non-padding tokens/s")


if __name__ == "__main__":
    main()
