"""Count the bytes each rank's collectives move per optimizer step, to check the planner's
communication model against what the strategies really do (benchmarks and tests only).

Set ``ORCHESTRATOR_COMM_LOG=PREFIX`` and every rank appends one JSON line per optimizer step to
``PREFIX.rank<N>.jsonl``: the bytes it sent in collectives whose group stays inside a node
(``intra``) and in those that span nodes (``inter``), and the calls by kind. Nodes are groups of
``ORCHESTRATOR_RANKS_PER_NODE`` consecutive ranks (default: torchrun's LOCAL_WORLD_SIZE), so one
machine can stand for several nodes.

How: the ``torch.distributed`` collectives that FSDP2, HSDP, DeepSpeed and the loop call are
wrapped where they are looked up (the module attributes), and DDP's gradient all-reduce, which
runs in C++, is routed through torch's own Python ``allreduce_hook`` (same arithmetic) so the
wrapper sees it. Bytes are per-rank wire bytes of a ring algorithm, the same formulas the planner
uses (``wire_bytes``): what is compared is which collectives run, how often and how large.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

ENV = "ORCHESTRATOR_COMM_LOG"
RANKS_PER_NODE_ENV = "ORCHESTRATOR_RANKS_PER_NODE"


def wire_bytes(kind: str, full_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring collective over ``n`` ranks whose full (unsharded) tensor
    is ``full_bytes``: all-reduce 2 S (n-1)/n; all-gather, reduce-scatter, all-to-all S (n-1)/n;
    broadcast S (pipelined)."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * full_bytes * (n - 1) / n
    if kind == "broadcast":
        return float(full_bytes)
    return full_bytes * (n - 1) / n


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if hasattr(t, "element_size") else 0


# name -> (kind, how to find the full tensor's bytes from (args, kwargs, group size))
def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


_COLLECTIVES: dict[str, tuple[str, Callable[[tuple, dict, int], int]]] = {
    "all_reduce": ("all_reduce", lambda a, k, n: _nbytes(_arg(a, k, 0, "tensor"))),
    "all_reduce_coalesced": ("all_reduce", lambda a, k, n: _nbytes(_arg(a, k, 0, "tensors"))),
    "broadcast": ("broadcast", lambda a, k, n: _nbytes(_arg(a, k, 0, "tensor"))),
    "all_gather": ("all_gather", lambda a, k, n: _nbytes(_arg(a, k, 1, "tensor")) * n),
    "all_gather_single": ("all_gather", lambda a, k, n: _nbytes(_arg(a, k, 0, "output_tensor"))),
    "all_gather_into_tensor": ("all_gather", lambda a, k, n: _nbytes(_arg(a, k, 0, "output_tensor"))),
    "_all_gather_base": ("all_gather", lambda a, k, n: _nbytes(_arg(a, k, 0, "output_tensor"))),
    "reduce_scatter": ("reduce_scatter", lambda a, k, n: _nbytes(_arg(a, k, 1, "input_list"))),
    "reduce_scatter_single": ("reduce_scatter", lambda a, k, n: _nbytes(_arg(a, k, 1, "input"))),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k, n: _nbytes(_arg(a, k, 1, "input"))),
    "_reduce_scatter_base": ("reduce_scatter", lambda a, k, n: _nbytes(_arg(a, k, 1, "input"))),
    "all_to_all_single": ("all_to_all", lambda a, k, n: _nbytes(_arg(a, k, 1, "input"))),
}


class CommCounter:
    def __init__(self, path: Path, rank: int, ranks_per_node: int):
        self.path, self.rank, self.ranks_per_node = path, rank, max(ranks_per_node, 1)
        self.intra = self.inter = 0.0
        self.calls: Counter = Counter()
        self.step = 0
        self._depth = 0  # a wrapped collective calling another (coalesced -> plain) counts once

    def record(self, kind: str, full_bytes: int, group) -> None:
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        sent = wire_bytes(kind, full_bytes, len(ranks))
        if len({r // self.ranks_per_node for r in ranks}) > 1:
            self.inter += sent
        else:
            self.intra += sent
        self.calls[kind] += 1

    def flush(self) -> None:
        self.step += 1
        with self.path.open("a") as f:
            f.write(json.dumps({"step": self.step, "intra": self.intra, "inter": self.inter,
                                "calls": dict(self.calls)}) + "\n")
        self.intra = self.inter = 0.0
        self.calls.clear()

    def wrap(self, name: str, fn: Callable) -> Callable:
        kind, size = _COLLECTIVES[name]

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                import torch.distributed as dist

                group = kwargs.get("group")
                n = dist.get_world_size(group) if group is not None else dist.get_world_size()
                self.record(kind, size(args, kwargs, n), group)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted


_COUNTER: Optional[CommCounter] = None


def install(rank: int) -> Optional[CommCounter]:
    """Start counting when ORCHESTRATOR_COMM_LOG is set (call before the strategy wraps)."""
    global _COUNTER
    prefix = os.environ.get(ENV)
    if not prefix or _COUNTER is not None:
        return _COUNTER
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    rpn = int(os.environ.get(RANKS_PER_NODE_ENV) or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    path = Path(f"{prefix}.rank{rank}.jsonl")
    path.unlink(missing_ok=True)
    counter = CommCounter(path, rank, rpn)
    import torch.distributed.distributed_c10d as c10d

    for name in _COLLECTIVES:
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, counter.wrap(name, getattr(c10d, name)))
    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def init_with_hook(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        self.register_comm_hook(None, allreduce_hook)

    torch.nn.parallel.DistributedDataParallel.__init__ = init_with_hook
    register_optimizer_step_post_hook(lambda opt, args, kwargs: counter.flush())
    _COUNTER = counter
    return counter
