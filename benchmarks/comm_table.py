"""The communication plan's table for a model on several job shapes (no training, no GPU):
bytes per rank per optimizer step, intra-node and inter-node, the lower bound on communication
time, each strategy's planned memory per rank, and the recommendation.

    python benchmarks/comm_table.py [--model llama3_70b] [--nodes 1,2,8,32] [--gpus 8] [overrides]
    python benchmarks/comm_table.py --measure 50m    # the plan against counted traffic, trained here

``--measure SIZE`` trains each strategy for a few steps on 2 CPU ranks (HSDP on 4 ranks standing
for 2 nodes x 2) with ``ORCHESTRATOR_COMM_LOG`` set, and prints counted against planned bytes per
step (median of the steps after the first), intra and inter node.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.prepare import build_config  # noqa: E402
from orchestrator.config import DDPConfig, DeepSpeedConfig, FSDPConfig  # noqa: E402
from orchestrator.plan import GiB, comm_plan_for_run, plan_for_run  # noqa: E402
from orchestrator.plan.recommend import recommend  # noqa: E402

STRATEGIES = {
    "ddp": DDPConfig(), "fsdp (adapter sharded)": FSDPConfig(replicate=1),
    "fsdp shard_base, all ranks": FSDPConfig(shard_base=True, replicate=1),
    "HSDP shard_base (node x node)": FSDPConfig(shard_base=True, replicate=0),
    "zero2": DeepSpeedConfig(zero_stage=2), "zero3": DeepSpeedConfig(zero_stage=3),
}


MEASURED = {
    "ddp": (2, 2, ["strategy=ddp"]), "fsdp": (2, 2, ["strategy=fsdp"]),
    "fsdp shard_base": (2, 2, ["strategy=fsdp", "strategy.shard_base=true"]),
    "HSDP 2x2": (4, 2, ["strategy=fsdp", "strategy.shard_base=true", "strategy.replicate=2"]),
    "zero2": (2, 2, ["strategy=deepspeed", "strategy.zero_stage=2"]),
    "zero3": (2, 2, ["strategy=deepspeed", "strategy.zero_stage=3"]),
}


def measure(size: str, root: Path) -> None:
    import json
    import os
    import statistics

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import train
    from synthetic import build_llama

    from orchestrator.config import from_container

    model = build_llama(root / f"model-{size}", size) if size != "tiny" else None
    print(f"| {size} | strategy | counted intra / plan | counted inter / plan | error |")
    print("| --- | --- | --- | --- | --- |")
    for name, (world, rpn, overrides) in MEASURED.items():
        run_dir = root / name.replace(" ", "_")
        os.environ["ORCHESTRATOR_COMM_LOG"] = str(run_dir / "comm")
        os.environ["ORCHESTRATOR_RANKS_PER_NODE"] = str(rpn)
        out = train(run_dir, [*([f"model.path={model}"] if model else []), f"launcher.nproc_per_node={world}",
                              "trainer.max_steps=4", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
                              "trainer.eval_generate_examples=0", "data.max_seq_len=128",
                              "trainer.save_every_minutes=0", *overrides])
        if "error" in out:
            print(f"| {size} | {name} | failed: {out['error']} | | |")
            continue
        rows = [json.loads(x) for x in (run_dir / "comm.rank0.jsonl").read_text().splitlines()][1:]
        intra = statistics.median(r["intra"] for r in rows)
        inter = statistics.median(r["inter"] for r in rows)
        cfg = from_container(yaml.safe_load((run_dir / "config.yaml").read_text()))
        plan = comm_plan_for_run(cfg, world, rpn)
        err = (intra + inter) / max(plan.intra + plan.inter, 1) - 1
        print(f"| {size} | {name} | {intra:,.0f} / {plan.intra:,.0f} | {inter:,.0f} / {plan.inter:,.0f} | {err:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", default=None, help="tiny or a benchmarks/synthetic.py size (50m)")
    ap.add_argument("--out", type=Path, default=Path("runs") / "comm-measure")
    ap.add_argument("--model", default="llama3_70b")
    ap.add_argument("--nodes", default="1,2,8,32")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("overrides", nargs="*", default=[
        "data.max_seq_len=2048", "trainer.micro_batch_size=1"])
    args = ap.parse_args()
    if args.measure:
        measure(args.measure, args.out.resolve())
        return
    print("| nodes x GPUs | strategy | intra GB/step | inter GB/step | comm >= ms | memory GiB/rank | fits |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for nodes in (int(n) for n in args.nodes.split(",")):
        world = nodes * args.gpus
        cfg = build_config([f"model={args.model}", "launcher=slurm", f"launcher.nodes={nodes}",
                            f"launcher.gpus_per_node={args.gpus}",
                            f"trainer.global_batch_size={world * 2}", *args.overrides])
        p = cfg.plan
        for name, strategy in STRATEGIES.items():
            variant = copy.deepcopy(cfg)
            variant.strategy = strategy
            comm = comm_plan_for_run(variant, world, args.gpus)
            mem = plan_for_run(variant, world, ranks_per_node=args.gpus)
            t = comm.seconds(p.intra_node_gb_per_s, p.inter_node_gbit_per_s)
            print(f"| {nodes} x {args.gpus} | {name} | {comm.intra / 1e9:.2f} | {comm.inter / 1e9:.2f} | "
                  f"{t * 1e3:.1f} | {mem.peak_bytes / GiB:.1f} | {'yes' if mem.fits else 'no'} |")
        best = recommend(cfg, world, args.gpus)
        print(f"| {nodes} x {args.gpus} | **recommended: {best.overrides if best else 'none fits'}** | | | | | |")


if __name__ == "__main__":
    main()
