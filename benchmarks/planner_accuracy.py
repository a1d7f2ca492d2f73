"""Planned against measured peak memory per rank, for real short `orchestrate train` runs.

    python benchmarks/planner_accuracy.py [--models tiny 50m] [--steps 100] [--precision fp32 bf16]
    python benchmarks/planner_accuracy.py --calibrate     # the CPU constants of orchestrator/plan/cpu_fit.py
    python benchmarks/planner_accuracy.py --real --out DIR  # real-size model, real vocabulary and lengths

Each run trains under one strategy and precision; train.py writes the planner's expectation
(`planned_peak_memory_mb`) and the measured peak over the whole run (`peak_memory_mb`: process
RSS on CPU, the allocator peak on CUDA) into summary.json, and this script tabulates the error,
beside the peak after the first step (metrics.jsonl): on CPU the process grows over its first
~50-100 steps (runtime buffers and heap, with any model), so a plan checked against a few steps
looks better than it is.

`--calibrate` fits the planner's CPU constants, on models the accuracy table does not use:
a negligible model (hidden 64, one layer), whose fp32 peak is the runtime itself
(CPU_RUNTIME_BYTES), then the ~17M "20m" model, whose peak above its live bytes is what the host
keeps beyond them, as a fraction of a step's transient bytes (CPU_RETENTION, per precision: in
bf16 oneDNN's per-shape kernel buffers add to glibc's retention).
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


def train_run(model_dir: Path, overrides: list[str], steps: int, nproc: int, run_dir: Path,
              reuse: bool = False) -> dict:
    """The run's summary.json (plus ``first_step_peak_mb``), or {"error": ...}."""
    out = train(run_dir, [f"model.path={model_dir}", f"trainer.max_steps={steps}",
                          f"launcher.nproc_per_node={nproc}", *COMMON, *overrides], reuse=reuse)
    if "summary" not in out:
        return out
    first = next((m["peak_memory_mb"] for m in out["metrics"] if "peak_memory_mb" in m), [0.0])
    return {**out["summary"], "first_step_peak_mb": max(first)}


def planned_mb(model_dir: Path, overrides: list[str], nproc: int) -> float:
    """The peak the planner gives such a run now (a run read back may have logged an older one)."""
    sys.path.insert(0, str(ROOT))
    from launch.auto import prepared_lengths
    from launch.prepare import build_config
    from orchestrator import plan as P

    cfg = build_config([f"model.path={model_dir}", *COMMON, *overrides])
    return P.plan_for_run(cfg, nproc, "cpu", data=prepared_lengths(cfg)).measurable_bytes() / P.MiB


def planned_items(model_dir: Path, overrides: list[str], nproc: int) -> dict[str, float]:
    """The train phase of the plan a run with these overrides logs, in MB per item."""
    sys.path.insert(0, str(ROOT))
    from launch.prepare import build_config
    from orchestrator import plan as P

    from launch.auto import prepared_lengths

    cfg = build_config([f"model.path={model_dir}", *COMMON, *overrides])
    plan = P.plan_for_run(cfg, nproc, "cpu", data=prepared_lengths(cfg))  # as train.py plans
    train = next(p for p in plan.phases if p.name == "train")
    return {k: v / P.MiB for k, v in train.items.items()}


#: --real: the data sets of benchmarks/real_model.py, each with and without checkpointing.
REAL_DATA = {
    "short instruction rows": ["data.path={out}/short.jsonl", "data.format=alpaca"],
    "full 256-token chats": ["data.path={out}/chats.jsonl", "data.format=chat"],
}
REAL_RUN = ["data=jsonl", "data.max_seq_len=256", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", "data.cache_dir={out}/cache"]


def real_runs(out: Path, steps: int, nproc: int, extra: list[str]) -> list[tuple[str, Path, dict]]:
    """Train (or read back, ``out`` keeps finished runs) the real-size model on both data sets."""
    from real_model import build_qwen_llama, write_full_chats, write_short_rows

    out.mkdir(parents=True, exist_ok=True)
    model = build_qwen_llama(out / "model")
    if not (out / "short.jsonl").exists():
        write_short_rows(out / "short.jsonl")
        write_full_chats(out / "chats.jsonl")
    rows = []
    for data, data_overrides in REAL_DATA.items():
        for ckpt in ("false", "true"):
            overrides = [o.format(out=out) for o in REAL_RUN + data_overrides] + [
                f"model.gradient_checkpointing={ckpt}", *extra]
            name = f"{'short' if 'short' in data else 'chats'}-ckpt_{ckpt}"
            s = train_run(model, overrides, steps, nproc, out / "runs" / name, reuse=True)
            rows.append((f"{data}, checkpointing {'on' if ckpt == 'true' else 'off'}", out / "runs" / name, s))
    return rows


def real_table(out: Path, steps: int, nproc: int, extra: list[str]) -> None:
    """Planned against measured on the real-size model: before (every row planned at
    data.max_seq_len) and after (the data's real lengths, what train.py now plans)."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from launch.auto import prepared_lengths
    from orchestrator import plan as P
    from orchestrator.config import from_container

    def err(planned: float, measured: float) -> str:
        return f"{planned:.0f} ({_err(planned, measured)})"

    print("| data | longest row | planned at max_seq_len MB (error) | planned at real lengths MB "
          "(error) | measured MB/rank | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, run_dir, s in real_runs(out, steps, nproc, extra):
        if "error" in s:
            print(f"| {name} | failed: {s['error']} | | | | |", flush=True)
            continue
        cfg = from_container(yaml.safe_load((run_dir / "config.yaml").read_text()))  # as the ranks ran it
        lengths = prepared_lengths(cfg)
        before, after = (P.plan_for_run(cfg, nproc, "cpu", data=d).measurable_bytes() / P.MiB
                         for d in (None, lengths))
        measured = max(s["peak_memory_mb"])
        print(f"| {name} | {lengths.train} | {err(before, measured)} | {err(after, measured)} | "
              f"{' / '.join(f'{m:.0f}' for m in s['peak_memory_mb'])} | {s['tokens_per_s']:.0f} |", flush=True)


def _ok(summary: dict) -> dict:
    if "error" in summary:
        sys.exit(f"calibration run failed: {summary['error']}")
    return summary


def extra_allocator(extra: list[str]) -> str:
    """launcher.cpu_allocator as the extra overrides set it (auto unless they do)."""
    return next((o.split("=", 1)[1] for o in extra if o.startswith("launcher.cpu_allocator=")), "auto")


def calibrate(tmp: Path, cache: Path, steps: int, nproc: int, precisions: list[str],
              extra: list[str]) -> None:
    """Fit, per precision, CPU_RUNTIME_BYTES (the negligible model: the runtime, and in bf16
    oneDNN's kernels, whatever the model) and CPU_RETENTION (the 17M model) over whole runs, for
    the host allocator the ranks run under (``launcher.cpu_allocator=glibc`` among the extra
    overrides fits glibc's tables; mimalloc's otherwise, where it is installed)."""
    from orchestrator import plan as P

    from orchestrator.hostalloc import planned

    allocator = planned(extra_allocator(extra))
    print(f"host allocator of the ranks: {allocator}", flush=True)
    micro, mid = build_llama(cache / "micro", "micro"), build_llama(cache / "20m", "20m")
    for precision in precisions:
        half = 2 if precision == "bf16" else 4
        runtime: dict[str, float] = {}
        for name, key in (("ddp", "ddp"), ("fsdp", "fsdp"), ("zero2", "deepspeed")):
            overrides = [*STRATEGIES[name], f"trainer.precision={precision}", *extra]
            s = _ok(train_run(micro, overrides, steps, nproc, tmp / f"cal-micro-{name}-{precision}"))
            model_mb = sum(v for k, v in planned_items(micro, overrides, nproc).items()
                           if k not in (P.OVERHEAD, P.RETENTION))
            runtime[key] = max(s["peak_memory_mb"]) - model_mb
        print(f"CPU_RUNTIME_BYTES ({precision}, MiB):", {k: round(v) for k, v in runtime.items()}, flush=True)
        retention: dict[str, float] = {}
        for name, overrides in STRATEGIES.items():
            overrides = [*overrides, f"trainer.precision={precision}", *extra]
            s = _ok(train_run(mid, overrides, steps, nproc, tmp / f"cal-20m-{name.replace(' ', '_')}-{precision}"))
            items = planned_items(mid, overrides, nproc)
            live = sum(v for k, v in items.items() if k not in (P.OVERHEAD, P.RETENTION))
            key = "deepspeed" if name.startswith("zero") else name.split()[0]
            transient = items[P.RETENTION] / P.cpu_retention(name, half, allocator)  # the heap-sized ones
            retention[name] = (max(s["peak_memory_mb"]) - runtime[key] - live) / transient
        print(f"CPU_RETENTION ({precision}):", {k: round(v, 2) for k, v in retention.items()}, flush=True)


def model_dirs(names: list[str], tmp: Path) -> dict[str, Path]:
    return {n: TINY if n == "tiny" else build_llama(tmp / n, n) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "50m"], choices=["tiny", "micro", "20m", "50m", "1b"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (the peak is the whole run's)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="trainer.precision of the runs (bf16 autocast runs without native bf16 too, slower)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder where built models are kept and reused (default: a temporary one)")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the planner's CPU runtime and retention constants (held-out models)")
    ap.add_argument("--real", action="store_true",
                    help="the real-size model (151k vocabulary) on short and full-length rows "
                         "(benchmarks/real_model.py; needs the bench extra)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the runs (and, with --real, the model and data); finished "
                         "runs there are read back instead of trained again")
    ap.add_argument("extra", nargs="*", help="more overrides for every run")
    args = ap.parse_args()
    if args.real:
        out = args.out or Path(tempfile.mkdtemp(prefix="planner-real-"))
        return real_table(out.resolve(), args.steps, args.nproc, args.extra)
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibrate:
            return calibrate(Path(tmp), args.cache or Path(tmp), args.steps, args.nproc, args.precision,
                             args.extra)
        dirs = model_dirs(args.models, args.cache or Path(tmp))
        print(f"{args.steps} steps per run, {args.nproc} ranks")
        print("| model | strategy | precision | planned MB/rank | measured MB/rank (whole run) | error "
              "| measured after step 1 | error |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for model, path in dirs.items():
            for name in args.strategies:
                for precision in args.precision:
                    run_dir = (args.out or Path(tmp)) / "runs" / f"{model}-{name.replace(' ', '_')}-{precision}"
                    overrides = [*STRATEGIES[name], f"trainer.precision={precision}", *args.extra]
                    s = train_run(path, overrides, args.steps, args.nproc, run_dir, reuse=args.out is not None)
                    if "error" in s:
                        print(f"| {model} | {name} | {precision} | failed: {s['error']} | | | | |", flush=True)
                        continue
                    measured, first = max(s["peak_memory_mb"]), s["first_step_peak_mb"]
                    planned = planned_mb(path, overrides, args.nproc)
                    print(f"| {model} | {name} | {precision} | {planned:.0f} | {measured:.0f} | "
                          f"{_err(planned, measured)} | {first:.0f} | {_err(planned, first)} |", flush=True)


def _err(planned: float, measured: float) -> str:
    return f"{100 * (planned - measured) / measured:+.1f}%" if planned and measured else "-"


if __name__ == "__main__":
    main()
