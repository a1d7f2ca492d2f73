"""Low-memory loading for strategies that shard the 4-bit base: load and quantize once.

If every rank loaded the base, host RAM would hold ``world x model`` during start-up, which is
what keeps a 70B model off a node even when its shards would fit. Here only rank 0 loads and
quantizes (on the host, into CPU memory); every rank builds the *same* model on the meta device
from what rank 0 describes (config, which linears are 4-bit, packed shapes, quantization
constants), the strategy shards that empty model, and then rank 0 sends each rank its shard of
every tensor (``distribute_tensor`` scatters from rank 0, one tensor at a time). Peak host
memory is one full model on rank 0 plus one shard per rank, whatever the world size.

The skeleton is built from rank 0's description rather than by re-running transformers'
quantizer logic on each rank, so the two cannot disagree about which modules are quantized; a
final name/shape/dtype comparison turns any remaining mismatch into a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .config import LoraConfig, ModelConfig, QuantConfig
from . import faults
from .distributed import DistInfo, broadcast_object, while_rank0_works
from .model import attach_lora, contiguous_head_input, disable_cpu_repacking, load_base, prepare_loaded


@dataclass
class SourceModel:
    """What rank 0 loaded: the full quantized PEFT model whose tensors the others receive."""

    model: nn.Module
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """Everything but the values: enough for any rank to rebuild rank 0's model on meta."""

    config: Any  # transformers PretrainedConfig (with its quantization_config)
    generation_config: Any
    quantized: dict[str, dict[str, Any]]  # Linear4bit module name -> shapes and flags
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # param/buffer name -> shape, dtype


def _describe(base: nn.Module) -> ModelSpec:
    """Rank 0's loaded base, before LoRA wraps its linears (the names are the base's own)."""
    import bitsandbytes as bnb

    quantized = {}
    for name, module in base.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            quantized[name] = {
                "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None, "packed": tuple(w.shape), "storage": w.dtype,
                "blocksize": w.blocksize, "compress_statistics": w.compress_statistics,
                "quant_type": w.quant_type, "compute_dtype": module.compute_dtype,
            }
    return ModelSpec(config=base.config, generation_config=base.generation_config,
                     quantized=quantized, tensors={})


def _tensor_specs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: (tuple(t.shape), t.dtype) for n, t in named}


def _quant_state_dict(module: nn.Module) -> dict[str, Any]:
    """The module's QuantState as plain, picklable CPU values (bitsandbytes' own format)."""
    state = module.weight.quant_state.as_dict(packed=False)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _skeleton(spec: ModelSpec, model_cfg: ModelConfig, lora: LoraConfig, compute_dtype: torch.dtype,
              source: Optional[SourceModel], dist: DistInfo) -> nn.Module:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            spec.config, dtype=compute_dtype, attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    base.generation_config = spec.generation_config
    source_base = source.model.get_base_model() if source is not None else None
    for name, q in spec.quantized.items():
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(
                q["in"], q["out"], q["bias"], q["compute_dtype"],
                compress_statistics=q["compress_statistics"], quant_type=q["quant_type"],
                quant_storage=q["storage"],
            )
            layer.weight = bnb.nn.Params4bit(
                torch.empty(q["packed"], dtype=q["storage"]), requires_grad=False,
                blocksize=q["blocksize"], compress_statistics=q["compress_statistics"],
                quant_type=q["quant_type"], quant_storage=q["storage"], bnb_quantized=True,
                module=layer,
            )
        # The quantization constants are small and every rank needs all of them (each
        # all-gathered weight is dequantized whole); one broadcast per layer bounds the spike.
        # (rank 0's linears are wrapped by LoRA now: the 4-bit layer is their base_layer)
        state = broadcast_object(
            _quant_state_dict(source_base.get_submodule(name).get_base_layer())
            if source_base is not None else None
        )
        quant_state = QuantState.from_dict(state, device=dist.device)
        layer.quant_state = quant_state  # bitsandbytes restores weight.quant_state from here
        layer.weight.quant_state = quant_state
        base.set_submodule(name, layer)
    base.is_loaded_in_4bit = bool(spec.quantized)
    if spec.quantized:
        base.hf_quantizer = AutoHfQuantizer.from_config(spec.config.quantization_config)
        disable_cpu_repacking(base)
    # No cast on the skeleton: _match gives every tensor rank 0's dtype (quant.frozen_dtype's).
    contiguous_head_input(base)
    prepare_loaded(base, model_cfg, quantized=bool(spec.quantized))
    model = attach_lora(base, lora)
    _match(model, spec)
    return model


def _match(model: nn.Module, spec: ModelSpec) -> None:
    """Give the skeleton rank 0's dtypes and fail loudly on any structural difference."""
    mine = dict([*model.named_parameters(), *model.named_buffers()])
    if set(mine) != set(spec.tensors):
        diff = sorted(set(mine) ^ set(spec.tensors))[:5]
        raise RuntimeError(f"low-memory loading: the meta model differs from rank 0's in {diff}")
    for name, (shape, dtype) in spec.tensors.items():
        t = mine[name]
        if tuple(t.shape) != shape:
            raise RuntimeError(
                f"low-memory loading: {name} has shape {tuple(t.shape)} here, {shape} on rank 0"
            )
        if t.dtype != dtype:
            t.data = t.data.to(dtype)


def load_for_sharding(model_cfg: ModelConfig, quant: QuantConfig, lora: LoraConfig,
                      compute_dtype: torch.dtype, storage_dtype: torch.dtype,
                      dist: DistInfo) -> tuple[nn.Module, Optional[SourceModel]]:
    """(meta PEFT model on every rank, rank 0's loaded source or None elsewhere).

    The caller shards the meta model and then calls ``fill_from_rank0``. Rank 0 loads on the
    host: it may not fit on one accelerator, which is why the base is being sharded at all.
    """
    rng = torch.random.get_rng_state()

    def load() -> tuple[SourceModel, ModelSpec]:
        faults.pause("slow_load", dist.rank)  # tests: a load slower than the collective timeout
        base = load_base(model_cfg, quant, compute_dtype, torch.device("cpu"),
                         storage_dtype=storage_dtype)
        spec = _describe(base)
        loaded = attach_lora(base, lora)
        spec.tensors = _tensor_specs(loaded)
        return SourceModel(loaded, dict(loaded.named_parameters()), dict(loaded.named_buffers())), spec

    # However long rank 0 takes (CPU quantization runs at ~15 M weights/s: a 70B base takes over
    # an hour), the others wait outside any collective (distributed.while_rank0_works).
    source, spec = while_rank0_works(load, "loading the base", dist) or (None, None)
    spec = broadcast_object(spec)
    torch.random.set_rng_state(rng)  # the skeleton's (meta) LoRA init must not shift the RNG
    return _skeleton(spec, model_cfg, lora, compute_dtype, source, dist), source


@torch.no_grad()
def fill_from_rank0(model: nn.Module, source: Optional[SourceModel], dist: DistInfo,
                    param_device: torch.device) -> None:
    """Materialise the (sharded) meta ``model`` with rank 0's values, one tensor at a time.

    Sharded parameters (DTensors) get only their local shard; everything else is broadcast
    whole. ``param_device`` is where parameters live (the host under CPU offload); buffers
    always live on the compute device.
    """
    import torch.distributed as tdist
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=param_device)
    for name, param in model.named_parameters():
        full = _full_tensor(source.params[name] if source else None, param, dist.device)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())
        else:
            tdist.broadcast(full, src=0)
            param.copy_(full)
    for name, buf in list(model.named_buffers()):
        full = _full_tensor(source.buffers[name] if source else None, buf, dist.device)
        tdist.broadcast(full, src=0)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = full
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"low-memory loading left tensors on the meta device: {leftovers[:5]}")


def _full_tensor(src: Optional[torch.Tensor], like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's full tensor on the communication device; an empty one of its size elsewhere."""
    if src is not None:
        return src.detach().to(device=device, dtype=like.dtype).contiguous()
    return torch.empty(tuple(like.shape), dtype=like.dtype, device=device)
