"""What autograd saves in one training forward, per strategy: the check behind the planner's
activation model, and how the ZeRO-3 linear replacement was found (benchmarks/RESULTS.md).

    torchrun --nproc_per_node 2 benchmarks/saved_activations.py [--model PATH] [overrides ...]
    torchrun --nproc_per_node 2 benchmarks/saved_activations.py strategy=deepspeed strategy.zero_stage=3

Builds the strategy exactly as ``orchestrate train`` does (load, shard, wrap), runs one forward
of a micro-batch of random tokens under the run's autocast, and records every tensor autograd
saves for the backward (saved-tensor hooks, each storage counted once, parameters excluded).
Rank 0 prints the total next to the planner's ``saved_activation_bytes`` and the largest groups
by shape and dtype.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.prepare import build_config  # noqa: E402
from orchestrator import plan as P  # noqa: E402
from orchestrator.distributed import init_distributed, resolve_precision, shutdown  # noqa: E402
from orchestrator.loss import token_loss_sum  # noqa: E402
from orchestrator.model import compute_autocast  # noqa: E402
from orchestrator.strategies import BatchPlan, build_strategy  # noqa: E402


def held_weight_bytes(root) -> int:
    """Bytes of the distinct storages that the graph's 4-bit matmul nodes keep for their backward
    (bitsandbytes' ``ctx.tensors``; the ZeRO-3 path's ``ctx.weight``). A view of a gathered
    ZeRO-3 weight keeps the gathered storage alive after DeepSpeed released the parameter; the
    parameter object itself does not (its ``.data`` is swapped for an empty tensor)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kept = [t for t in (getattr(node, "tensors", None) or ()) if isinstance(t, torch.Tensor)]
        if isinstance(getattr(node, "weight", None), torch.Tensor):
            kept.append(node.weight)
        for t in kept:
            try:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            except RuntimeError:  # a storage FSDP2 freed in place (resized to 0): holds nothing
                pass
        stack += [n for n, _ in node.next_functions]
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model.path (default: the embedded tiny model)")
    ap.add_argument("--top", type=int, default=8, help="how many tensor groups to list")
    ap.add_argument("overrides", nargs="*", help="orchestrate train overrides (strategy, lora, ...)")
    args = ap.parse_args()
    cfg = build_config([*([f"model.path={args.model}"] if args.model else []), *args.overrides])
    dist = init_distributed(600)
    dtype = resolve_precision(cfg.trainer.precision, dist.device)
    strategy = build_strategy(cfg.strategy, dist, dtype)
    model = strategy.load_model(cfg.model, cfg.quant, cfg.lora)
    strategy.setup(model, cfg.optim, 10, BatchPlan(cfg.trainer.micro_batch_size, 1, 1.0))
    shape = P.read_shape(cfg.model.path)
    torch.manual_seed(0)
    ids = torch.randint(3, shape.vocab, (cfg.trainer.micro_batch_size, cfg.data.max_seq_len), device=dist.device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}
    groups: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in sizes:
            sizes[ptr] = st.nbytes()
            groups[(tuple(t.shape), str(t.dtype).replace("torch.", ""), st.nbytes())] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with compute_autocast(dist.device.type, dtype):
            logits = strategy.train_module(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           use_cache=False).logits
            token_loss_sum(logits, ids)
    held = held_weight_bytes(logits.grad_fn)
    if dist.is_main:
        setup = P.setup_from_config(cfg, dist.world_size, dist.device.type, dtype.itemsize, shape)
        base = sum(P.nf4_bytes(a * c, cfg.quant.double_quant) for a, c in shape.linears().values()) * shape.layers
        print(f"4-bit weight storage the graph holds for the backward: {held / P.MiB:.1f} MiB "
              f"(the whole packed base: {base / P.MiB:.1f} MiB)")
        print(f"{strategy.name} {setup.describe()}: saved {sum(sizes.values()) / P.MiB:.1f} MiB, "
              f"planned {P.saved_activation_bytes(shape, setup) / P.MiB:.1f} MiB; "
              f"F.linear is {torch.nn.functional.linear.__name__}")
        for (shp, dt, nbytes), n in sorted(groups.items(), key=lambda kv: -kv[0][2] * kv[1])[: args.top]:
            print(f"  {n:4d} x {shp} {dt}: {n * nbytes / P.MiB:.1f} MiB")
    shutdown()


if __name__ == "__main__":
    main()
