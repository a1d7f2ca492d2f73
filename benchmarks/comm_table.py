"""The communication plan's table for a model on several job shapes (no training, no GPU):
bytes per rank per optimizer step, intra-node and inter-node, the lower bound on communication
time, each strategy's planned memory per rank, and the recommendation.

    python benchmarks/comm_table.py [--model llama3_70b] [--nodes 1,2,8,32] [--gpus 8] [overrides]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3_70b")
    ap.add_argument("--nodes", default="1,2,8,32")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("overrides", nargs="*", default=[
        "data.max_seq_len=2048", "trainer.micro_batch_size=1"])
    args = ap.parse_args()
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
