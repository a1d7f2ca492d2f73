"""Resident memory over training steps of changing batch width, on CPU: oneDNN's per-shape
kernel caches (issue #28).

    python benchmarks/kernel_cache.py [--model DIR] [--steps 80] [--precision bf16] [--entries 1024 256]

Each ``--entries`` value runs twice, each in its own process (the caches' sizes are read when
oneDNN makes its first primitive), loading the QLoRA model as training does and running
forward, backward and AdamW on random tokens for ``--steps`` steps: once at one width (128),
once at a width that changes every step (32-127). Prints peak RSS after chosen steps and the
wall time. In bf16
every new width adds its own primitives (with their buffers) to caches of 1024 entries by
default; fp32 matmuls do not go through oneDNN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKS = (1, 2, 5, 10, 20, 40, 60, 80, 120, 160, 200)


def worker(model: str, steps: int, precision: str, varying: bool) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from launch.prepare import build_config
    from orchestrator.model import attach_lora, compute_autocast, load_base

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    cfg = build_config([f"model.path={model}"])
    torch.manual_seed(0)
    net = attach_lora(load_base(cfg.model, cfg.quant, dtype, torch.device("cpu")), cfg.lora)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    peaks, t0 = {}, time.perf_counter()
    for step in range(1, steps + 1):
        width = 32 + (step * 37) % 96 if varying else 128
        ids = torch.randint(3, 100, (4, width))
        with compute_autocast("cpu", dtype):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in MARKS or step == steps:
            peaks[step] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return {"peak_mb": peaks, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "orchestrator" / "assets" / "tiny-llama"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--entries", nargs="+", type=int, default=[1024, 256],
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY (1024: oneDNN's default)")
    ap.add_argument("--worker", choices=("fixed", "varying"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.steps, args.precision, args.worker == "varying")))
        return
    print(f"model {args.model}, {args.precision}, {args.steps} steps of 4 rows")
    print("| cache entries | widths | peak RSS MB after step " + " / ".join(
        str(m) for m in MARKS if m <= args.steps) + " | seconds |")
    print("| --- | --- | --- | --- |")
    for entries in args.entries:
        env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(entries), "LRU_CACHE_CAPACITY": str(entries)}
        for kind in ("fixed", "varying"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", args.model,
                                  "--steps", str(args.steps), "--precision", args.precision],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peaks = " / ".join(str(v) for v in r["peak_mb"].values())
            print(f"| {entries} | {'one (128)' if kind == 'fixed' else 'new every step'} | {peaks} | {r['seconds']} |",
                  flush=True)


if __name__ == "__main__":
    main()
