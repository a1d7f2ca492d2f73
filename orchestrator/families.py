"""What a model family declares, read in one place for the strategies, the loader, LoRA and the
launcher's checks: which blocks FSDP shards, which weights 4-bit quantization reaches, which
modules "all-linear" LoRA means. No ``if model_type == ...`` anywhere: everything here is read
from the model itself (``_no_split_modules``, module types, parameter shapes), so a family
transformers adds tomorrow works the same way.

Why each rule:
- Blocks: transformers and accelerate shard and offload along ``_no_split_modules``, the classes
  a model declares must stay whole (its decoder layers); their attribute path differs by family
  (``model.layers``, ``gpt_neox.layers``, ``transformer.h``).
- Quantization: bitsandbytes' replacement in transformers takes ``type(m) is nn.Linear`` and
  ``Conv1D`` only. A family's own subclass of ``nn.Linear`` (Falcon's ``FalconLinear``) is left
  in 16/32 bits, silently; those are quantized here after loading, when their forward is a
  plain linear map (checked numerically). Mixture-of-experts layers keep their experts as 3-D
  parameters (Mixtral, Qwen3-MoE in transformers 5): no bitsandbytes layer holds those, so a
  run that asked for 4 bits would hold most of its weights in 16/32 bits. ``coverage`` measures
  that share; past ``UNQUANTIZED_LIMIT`` the run is refused unless ``quant.allow_unquantized``.
- LoRA's ``all-linear``: every linear layer (``nn.Linear`` and subclasses, 4-bit linears,
  ``Conv1D``) but the output head. PEFT's own ``all-linear`` also reaches MoE routers and fused
  experts (through ``ParamWrapper``, which refuses dropout); routers must stay frozen and in
  high precision, and LoRA on experts is asked for by name (``lora.target_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

#: Share of the base's matmul weights that may stay out of 4 bits before a run is refused.
UNQUANTIZED_LIMIT = 0.05


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def block_classes(model: nn.Module) -> set[str]:
    return set(getattr(hf_model(model), "_no_split_modules", None) or ())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard (outermost modules of the declared classes), in order."""
    model = hf_model(model)
    names = block_classes(model)
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if type(module).__name__ in names and not any(path.startswith(p + ".") for p in inside):
            blocks.append(module)
            inside.append(path)
    if not blocks:
        declared = f"declares {sorted(names)}, none of which it contains" if names else \
            "declares no blocks (_no_split_modules is empty)"
        raise ValueError(f"{type(model).__name__} {declared}: FSDP cannot find the layers to shard; "
                         "use strategy=ddp or strategy=deepspeed")
    return blocks


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer. Without bitsandbytes imported there can be none, and the
    launcher's checks (meta models) should not import it: its import prints kernel-hub warnings
    that would bury a one-line refusal."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """A matmul layer quantization and LoRA apply to (4-bit, plain or subclassed Linear, Conv1D)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.1f}{unit}"
    return str(n)


@dataclass
class Coverage:
    """How much of the base's matmul weight is stored in 4 bits, and what is not."""

    quantized: int = 0  # parameters in 4-bit layers
    left: dict[str, int] = field(default_factory=dict)  # name -> parameters left in 16/32 bits
    left_bytes: int = 0

    @property
    def share_left(self) -> float:
        total = self.quantized + sum(self.left.values())
        return sum(self.left.values()) / total if total else 0.0

    def describe(self, limit: int = 3) -> str:
        """Where the unquantized weight sits, grouped by the part of the name after the layer
        index (``mlp.experts.gate_up_proj``), largest first."""
        import re

        groups: dict[str, int] = {}
        for name, n in self.left.items():
            key = re.sub(r"^.*?\.\d+\.", "", name)
            groups[key] = groups.get(key, 0) + n
        top = sorted(groups.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} ({_count(v)})" for k, v in top[:limit])
        return text + (f" and {len(top) - limit} more" if len(top) > limit else "")


def coverage(model: nn.Module) -> Coverage:
    """What the loaded (or meta, planned) base stores in 4 bits. On a meta model built from the
    config, linear layers count as quantized (what loading will do, subclasses included) and
    the rest as left; on a loaded model, what is."""
    model = hf_model(model)
    head = model.get_output_embeddings()
    cov = Coverage()
    for name, module in model.named_modules():
        if module is head or "lora_" in name:  # the head stays 16-bit; adapters train
            continue
        if is_4bit(module):
            cov.quantized += int(torch.Size(module.weight.quant_state.shape).numel()) \
                if getattr(module.weight, "quant_state", None) is not None else module.in_features * module.out_features
            continue
        if is_linear(module):
            if module.weight.is_meta:
                cov.quantized += module.weight.numel()
            else:
                cov.left[name] = module.weight.numel()
                cov.left_bytes += module.weight.numel() * module.weight.element_size()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:  # fused experts: (experts, out, in)
                cov.left[f"{name}.{pname}"] = p.numel()
                cov.left_bytes += p.numel() * p.element_size()
    return cov


def check_coverage(cov: Coverage, method: str, allow_unquantized: bool, what: str = "the base") -> None:
    """Refuse a run that asked for 4 bits and would hold a significant share in 16/32 bits."""
    if method == "none" or allow_unquantized or cov.share_left <= UNQUANTIZED_LIMIT:
        return
    raise ValueError(
        f"quant={method}: {100 * cov.share_left:.0f}% of {what}'s matmul weights "
        f"({_count(sum(cov.left.values()))} parameters) would stay unquantized: {cov.describe()}; no 4-bit "
        "layer holds them (fused MoE experts, or layers of a type bitsandbytes does not replace). "
        "Set quant.allow_unquantized=true to train with them in 16 bits, or choose another model"
    )


def quantize_linear_subclasses(model: nn.Module) -> list[str]:
    """Replace ``nn.Linear`` subclasses of the base (not the head, not adapters) by 4-bit layers quantized as the
    model's ``quantization_config`` says, when their forward is a plain linear map.

    transformers' bitsandbytes integration only replaces exact ``nn.Linear`` (and ``Conv1D``);
    Falcon's ``FalconLinear`` and kin stay in 16/32 bits. The check runs the module and
    ``F.linear`` on the same small input: a subclass whose forward does anything else is left as
    it is (and counted by ``coverage``). Returns the names replaced.
    """
    import bitsandbytes as bnb

    model = hf_model(model)
    q = getattr(model.config, "quantization_config", None)
    if q is None or not getattr(q, "load_in_4bit", False):
        return []
    head = model.get_output_embeddings()
    replaced = []
    for name, module in list(model.named_modules()):
        if (not isinstance(module, nn.Linear) or type(module) is nn.Linear or module is head
                or isinstance(module, bnb.nn.Linear4bit) or "lora_" in name or module.weight.is_meta):
            continue
        w = module.weight
        with torch.no_grad():
            x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(w)
            if not torch.allclose(module(x), nn.functional.linear(x, w, module.bias), rtol=1e-3, atol=1e-3):
                continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                  q.bnb_4bit_compute_dtype, compress_statistics=q.bnb_4bit_use_double_quant,
                                  quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage,
                                  device=torch.device("meta"))
        layer.weight = bnb.nn.Params4bit(w.data.to("cpu"), requires_grad=False,
                                         compress_statistics=q.bnb_4bit_use_double_quant,
                                         quant_type=q.bnb_4bit_quant_type,
                                         quant_storage=q.bnb_4bit_quant_storage, module=layer)._quantize(w.device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        model.set_submodule(name, layer)
        replaced.append(name)
    return replaced


def lora_target_names(model: nn.Module) -> list[str]:
    """LoRA's ``all-linear``: the leaf names of every linear layer but the output head, or the
    full module names where a leaf name also belongs to a layer that is not linear."""
    model = hf_model(model)
    head = model.get_output_embeddings()
    linear, other = set(), set()
    full = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if is_linear(module) and module is not head:
            linear.add(leaf)
            full.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            other.add(leaf)
    return sorted(linear) if not (linear & other) else full


def meta_model(path: str, attn_implementation: Optional[str], trust_remote_code: bool) -> nn.Module:
    """The model a config describes, on the meta device (no memory, seconds for any size): what
    the launcher checks before any rank loads weights. Raises what transformers raises for an
    attention implementation the family does not support."""
    import logging

    from transformers import AutoConfig

    # The kernels hub client logs that it cannot check publishers offline while transformers
    # looks for an attention kernel: noise beside the launcher's one line, whatever the outcome.
    hub_log = logging.getLogger("kernels")
    level, hub_log.level = hub_log.level, logging.ERROR
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return _on_meta(config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    finally:
        hub_log.setLevel(level)


def conv1d_weights(config) -> set[str]:
    """Names of the weights that the unquantized model ``config`` describes stores as GPT-2-style
    ``Conv1D`` (in, out), where their 4-bit replacements hold (out, in): a merged export writes
    those transposed back. Read from a meta model of the config (no memory)."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return {f"{name}.weight" for name, m in _on_meta(config).named_modules() if _is_conv1d(m)}


def _on_meta(config, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)
