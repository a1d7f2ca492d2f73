"""Planned against measured peak memory per rank, for real short `orchestrate train` runs.

    python benchmarks/planner_accuracy.py [--models tiny 50m] [--steps 8] [--nproc 2]
    python benchmarks/planner_accuracy.py --calibrate     # the CPU runtime overhead per strategy

Each run trains for a few steps under one strategy; train.py writes the planner's expectation
(`planned_peak_memory_mb`) and the measured peak (`peak_memory_mb`: process RSS on CPU, the
allocator peak on CUDA) into summary.json, and this script tabulates the error. `--calibrate`
runs a negligible model (hidden 64, one layer), whose peak is the runtime itself: the numbers
behind orchestrator/plan.py's CPU_RUNTIME_BYTES.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import train  # noqa: E402
from strategies import STRATEGIES  # noqa: E402
from synthetic import TINY, build_llama  # noqa: E402

COMMON = ["trainer.eval_generate_examples=16", "trainer.eval_max_new_tokens=4", "trainer.save_every=0"]


def train_run(model_dir: Path, overrides: list[str], steps: int, nproc: int, run_dir: Path) -> dict:
    """The run's summary.json, or {"error": ...}."""
    out = train(run_dir, [f"model.path={model_dir}", f"trainer.max_steps={steps}",
                          f"launcher.nproc_per_node={nproc}", *COMMON, *overrides])
    return out.get("summary", out)


def model_dirs(names: list[str], tmp: Path) -> dict[str, Path]:
    return {n: TINY if n == "tiny" else build_llama(tmp / n, n) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "50m"], choices=["tiny", "micro", "50m", "1b"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder where built models are kept and reused (default: a temporary one)")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the runtime's own peak with a negligible model, per strategy")
    ap.add_argument("extra", nargs="*", help="more overrides for every run")
    args = ap.parse_args()
    if args.calibrate:
        args.models = ["micro"]
        args.strategies = ["ddp", "fsdp", "zero2"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = model_dirs(args.models, args.cache or Path(tmp))
        print("| model | strategy | planned MB/rank | measured MB/rank | error |")
        print("| --- | --- | --- | --- | --- |")
        for model, path in dirs.items():
            for name in args.strategies:
                run_dir = Path(tmp) / "runs" / f"{model}-{name.replace(' ', '_')}"
                s = train_run(path, STRATEGIES[name] + args.extra, args.steps, args.nproc, run_dir)
                if "error" in s:
                    print(f"| {model} | {name} | failed: {s['error']} | | |", flush=True)
                    continue
                measured = max(s["peak_memory_mb"])
                planned = s["planned_peak_memory_mb"][0]
                err = f"{100 * (planned - measured) / measured:+.1f}%" if planned else "-"
                print(f"| {model} | {name} | {planned:.0f} | {measured:.0f} | {err} |", flush=True)


if __name__ == "__main__":
    main()
