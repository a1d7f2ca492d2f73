"""The device mesh FSDP2 shards over: 1-D (every rank one shard) or 2-D for HSDP.

On a multi-node job, sharding the 4-bit base over every rank makes each forward and backward
all-gather base weights across the inter-node network. With ``replicate`` groups the base (and
the adapter) is sharded only inside a group, and groups replicate each other: one node's GPUs
hold the base between them, and only the adapter's gradient all-reduce crosses nodes
(torchtitan's and FSDP1's HYBRID_SHARD layout). Ranks are numbered node by node by torchrun
(rank = node_rank x local_world_size + local_rank), so consecutive ranks form a shard group.
"""

from __future__ import annotations

import os


class MeshError(ValueError):
    pass


def mesh_shape(replicate: int, world_size: int, local_world_size: int) -> tuple[int, int]:
    """(replica groups, ranks per group); ``replicate=0`` means one group per node."""
    groups = replicate or max(1, world_size // max(local_world_size, 1))
    if groups > world_size or world_size % groups:
        raise MeshError(
            f"strategy.replicate={groups} does not divide the {world_size} ranks into equal shard "
            f"groups; choose a divisor of {world_size} (0: one group per node, 1: plain FSDP)")
    return groups, world_size // groups


def local_world_size() -> int:
    """Ranks on this node, as torchrun (or the Slurm launcher through it) reports them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def describe(replicate: int, world_size: int, ranks_per_node: int) -> str:
    groups, shard = mesh_shape(replicate, world_size, ranks_per_node)
    if groups == 1:
        return f"FSDP over all {world_size} ranks (one shard group)"
    where = " (shard within each node, replicate across nodes)" if shard == ranks_per_node else ""
    return f"HSDP: {groups} replica groups x {shard} shards{where}"


def build_mesh(device_type: str, replicate: int, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    groups, shard = mesh_shape(replicate, world_size, local_world_size())
    if groups == 1:
        return init_device_mesh(device_type, (world_size,))
    return init_device_mesh(device_type, (groups, shard), mesh_dim_names=("replicate", "shard"))
