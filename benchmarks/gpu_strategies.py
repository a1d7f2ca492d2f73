"""Every strategy on the GPU, checked rather than only timed; the heart of gpu_check.sh.

    python benchmarks/gpu_strategies.py --model DIR [--steps 20] [--out DIR]

For each strategy (DDP, FSDP2 with the base ignored, sharded and with CPU offload, ZeRO-2 and
ZeRO-3) one real `orchestrate train` on the visible GPU(s); then the DDP run is merged and the
merged model generates. Printed per strategy: tokens/s, MFU, the compute dtype the adapters
really ran in (summary.json's ``forward_dtype``), and measured against planned memory (the
allocator's allocated and reserved peaks against the plan's allocated part and the plan with
its allocator reserve). Exits non-zero when any strategy fails, computes in another dtype than
bf16, or exceeds its plan, or when the merge or generation fails: the first GPU run's
checklist (issue #24) in one command.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, train, train_steps

from strategies import STRATEGIES as PLAIN

#: The benchmark's strategies, and FSDP2 with CPU offload (the cuda:nccl,cpu:gloo group).
STRATEGIES = {**PLAIN, "fsdp cpu_offload": ["strategy=fsdp", "strategy.cpu_offload=true"]}


def check(name: str, out: dict) -> tuple[str, list[str]]:
    """A table row and what is wrong with the run (empty: nothing)."""
    if "error" in out:
        return f"| {name} | failed: {out['error'][:120]} |||||", [f"{name}: {out['error']}"]
    s, steps = out["summary"], train_steps(out)
    warm = steps[min(3, len(steps) - 1):]
    tps = statistics.median(m["tokens_per_s"] for m in warm)
    mfu = statistics.median(m.get("mfu", 0.0) for m in warm)
    planned = s["planned_peak_memory_mb"][0] or 0.0
    allocated = max(s["peak_memory_mb"])
    reserved = s.get("peak_reserved_memory_mb") or 0.0
    problems = []
    if s["forward_dtype"] != "bfloat16" or s["precision"] != "bfloat16":
        problems.append(f"{name}: adapters computed in {s['forward_dtype']} (precision {s['precision']})")
    if planned and allocated > planned:
        problems.append(f"{name}: allocated peak {allocated:.0f} MB above the plan's {planned:.0f} MB")
    row = (f"| {name} | {tps:,.0f} | {100 * mfu:.1f}% | {s['forward_dtype']} | {planned:,.0f} | "
           f"{allocated:,.0f} ({100 * (allocated - planned) / max(planned, 1):+.1f}%) | {reserved:,.0f} | "
           f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} |")
    return row, problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES),
                    help="default: all (fsdp cpu_offload is refused where the ranks run on the CPU)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="gpu_strategies-"))
    common = [f"model.path={args.model}", f"trainer.max_steps={args.steps}", "launcher.nproc_per_node=1",
              "trainer.precision=bf16", "trainer.eval_generate_examples=8", "trainer.eval_max_new_tokens=4",
              "trainer.save_every=0"]
    print("| strategy | tokens/s | MFU | adapters in | planned MB | allocated MB | reserved MB | loss |")
    print("|---|---|---|---|---|---|---|---|")
    problems: list[str] = []
    for name in args.strategies:
        out = train(root / name.replace(" ", "_"), [*common, *STRATEGIES[name]])
        row, wrong = check(name, out)
        print(row, flush=True)
        problems += wrong
    ddp = root / "ddp"
    if (ddp / "adapter").exists():
        merged = subprocess.run([sys.executable, "-m", "launch", "merge", f"run_dir={ddp}", "dtype=bf16"],
                                cwd=ROOT, capture_output=True, text=True)
        answer = subprocess.run([sys.executable, "-m", "launch", "generate", f"run_dir={ddp}", "merged=true",
                                 "prompt=Reverse the word.", "input=planet", "max_new_tokens=8"],
                                cwd=ROOT, capture_output=True, text=True) if merged.returncode == 0 else merged
        print(f"\nmerge: {'ok' if merged.returncode == 0 else merged.stderr.strip().splitlines()[-1:]}; "
              f"generate (merged): {answer.stdout.strip()!r}" if answer.returncode == 0
              else f"\nmerge/generate failed: {answer.stderr.strip().splitlines()[-1:]}")
        if merged.returncode or answer.returncode:
            problems.append("merge or generate failed")
    else:
        problems.append("no DDP adapter to merge")
    for p in problems:
        print(f"FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
