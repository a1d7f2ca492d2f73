"""Planned against measured peak memory per rank, for real short `orchestrate train` runs.

    python benchmarks/planner_accuracy.py [--models tiny 50m] [--steps 8] [--nproc 2]
    python benchmarks/planner_accuracy.py --calibrate     # the CPU constants of orchestrator/plan.py

Each run trains for a few steps under one strategy; train.py writes the planner's expectation
(`planned_peak_memory_mb`) and the measured peak (`peak_memory_mb`: process RSS on CPU, the
allocator peak on CUDA) into summary.json, and this script tabulates the error.

`--calibrate` fits the planner's two CPU constants, on models the accuracy table does not use:
a negligible model (hidden 64, one layer), whose peak is the runtime itself (CPU_RUNTIME_BYTES),
then the ~17M "20m" model, whose peak above its live bytes is the host allocator's retention,
as a fraction of a step's transient bytes (CPU_RETENTION).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, train  # noqa: E402
from strategies import STRATEGIES  # noqa: E402
from synthetic import TINY, build_llama  # noqa: E402

COMMON = ["trainer.eval_generate_examples=16", "trainer.eval_max_new_tokens=4", "trainer.save_every=0"]


def train_run(model_dir: Path, overrides: list[str], steps: int, nproc: int, run_dir: Path) -> dict:
    """The run's summary.json, or {"error": ...}."""
    out = train(run_dir, [f"model.path={model_dir}", f"trainer.max_steps={steps}",
                          f"launcher.nproc_per_node={nproc}", *COMMON, *overrides])
    return out.get("summary", out)


def planned_items(model_dir: Path, overrides: list[str], nproc: int) -> dict[str, float]:
    """The train phase of the plan a run with these overrides logs, in MB per item."""
    sys.path.insert(0, str(ROOT))
    from launch.prepare import build_config
    from orchestrator import plan as P

    plan = P.plan_for_run(build_config([f"model.path={model_dir}", *COMMON, *overrides]), nproc, "cpu")
    train = next(p for p in plan.phases if p.name == "train")
    return {k: v / P.MiB for k, v in train.items.items()}


def _ok(summary: dict) -> dict:
    if "error" in summary:
        sys.exit(f"calibration run failed: {summary['error']}")
    return summary


def calibrate(tmp: Path, cache: Path, steps: int, nproc: int) -> None:
    from orchestrator import plan as P

    micro, mid = build_llama(cache / "micro", "micro"), build_llama(cache / "20m", "20m")
    runtime: dict[str, float] = {}
    for name, key in (("ddp", "ddp"), ("fsdp", "fsdp"), ("zero2", "deepspeed")):
        s = _ok(train_run(micro, STRATEGIES[name], steps, nproc, tmp / f"cal-micro-{name}"))
        model_mb = sum(v for k, v in planned_items(micro, STRATEGIES[name], nproc).items()
                       if k not in (P.OVERHEAD, P.RETENTION))
        runtime[key] = max(s["peak_memory_mb"]) - model_mb
    retention: dict[str, float] = {}
    for name, overrides in STRATEGIES.items():
        s = _ok(train_run(mid, overrides, steps, nproc, tmp / f"cal-20m-{name.replace(' ', '_')}"))
        items = planned_items(mid, overrides, nproc)
        live = sum(v for k, v in items.items() if k not in (P.OVERHEAD, P.RETENTION))
        key = "deepspeed" if name.startswith("zero") else name.split()[0]
        transient = items["activations"] + items["logits + loss"]
        retention[name] = (max(s["peak_memory_mb"]) - runtime[key] - live) / transient
    print("CPU_RUNTIME_BYTES (MiB):", {k: round(v) for k, v in runtime.items()})
    print("CPU_RETENTION:", {k: round(v, 2) for k, v in retention.items()})


def model_dirs(names: list[str], tmp: Path) -> dict[str, Path]:
    return {n: TINY if n == "tiny" else build_llama(tmp / n, n) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "50m"], choices=["tiny", "micro", "20m", "50m", "1b"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder where built models are kept and reused (default: a temporary one)")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the planner's CPU runtime and retention constants (held-out models)")
    ap.add_argument("extra", nargs="*", help="more overrides for every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibrate:
            return calibrate(Path(tmp), args.cache or Path(tmp), args.steps, args.nproc)
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
