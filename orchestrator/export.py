"""Merged export: the adapter folded into the base, saved as a plain transformers model.

The adapter was trained against the *quantized* base, so it is merged into the dequantized
4-bit weights (not into the original 16-bit checkpoint): that reproduces the QLoRA model
within bf16 noise, where merging into the re-quantized base would not (FACTS.md).

Bounded memory: the 16-bit model is never built. The base is loaded in 4 bits, as training
loaded it (so exactly the same layers are quantized, the same way), with the adapter on top;
then one weight at a time is dequantized, has its LoRA delta added (PEFT's own
``get_delta_weight``) in fp32, is cast to the output dtype, moved to the host and written into
a safetensors shard of at most ``shard_bytes``. Peak memory is the 4-bit base plus a few copies
of the largest weight plus one shard, where ``dequantize()`` + ``merge_and_unload()`` held the
whole model in 16 bits (140 GB for a 70B base, on one GPU when there was one). The 4-bit base
goes on the GPU when it fits the free memory there (bitsandbytes quantizes in seconds on a GPU,
~15 M weights/s on the host), else it stays on the host.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .families import conv1d_weights, is_4bit
from .model import DTYPES, load_base, load_tokenizer

#: Largest safetensors file written (the sum of its tensors' bytes), as transformers shards.
SHARD_BYTES = 5 * 2**30


class ExportError(ValueError):
    pass


def _run_config(run_dir: Path):
    from .rundir import NotARunDir, frozen_config

    try:
        cfg = frozen_config(run_dir)
    except NotARunDir as exc:
        raise ExportError(str(exc)) from None
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise ExportError(f"{run_dir}/adapter: no PEFT adapter; has the run finished?")
    return cfg


def merge_device(cfg, dtype: torch.dtype) -> torch.device:
    """The GPU when the 4-bit base (and a margin for one dequantized layer) fits its free
    memory, else the host."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from .plan import PlanError, nf4_bytes, read_shape

    try:
        shape = read_shape(cfg.model.path)
    except PlanError:
        return torch.device("cpu")
    quantized = cfg.quant.method != "none"
    n_q, n_o = shape.quantized_params(), shape.other_params()
    base = (nf4_bytes(n_q, cfg.quant.double_quant) if quantized else n_q * dtype.itemsize) + n_o * dtype.itemsize
    largest = max(a * c for a, c in shape.linears().values()) * 4 * 3  # fp32 weight, delta, sum
    free, _total = torch.cuda.mem_get_info()
    return torch.device("cuda") if base + largest < 0.9 * free else torch.device("cpu")


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a (possibly 4-bit) linear computes with, in fp32."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


def _merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the plain transformers model, fp32 or original tensor), one at a time.

    ``model`` is the transformers model with PEFT's LoRA layers injected. A LoRA layer's
    ``base_layer.weight`` becomes its module's ``weight`` plus every active adapter's delta;
    LoRA's own tensors are folded in and not written; a 4-bit layer without LoRA is dequantized;
    everything else (embeddings, norms, head, persistent buffers) passes through. Tied weights
    appear once, under their first name, as ``save_pretrained`` writes them.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        if ".lora_" in name:
            continue
        if owner_name.endswith(".base_layer") and isinstance(modules[owner_name[: -len(".base_layer")]], LoraLayer):
            lora_name = owner_name[: -len(".base_layer")]
            if attr == "weight":
                lora = modules[lora_name]
                w = _dense_weight(owner)
                for adapter in lora.active_adapters:
                    w += lora.get_delta_weight(adapter).float()
                yield f"{lora_name}.weight", w
            else:
                yield f"{lora_name}.{attr}", param.detach()
        elif attr == "weight" and isinstance(owner, bnb.nn.Linear4bit):
            yield name, _dense_weight(owner)
        else:
            yield name, param.detach()
    for owner_name, owner in modules.items():
        for attr, buf in owner._buffers.items():
            if buf is not None and attr not in owner._non_persistent_buffers_set:
                yield f"{owner_name}.{attr}" if owner_name else attr, buf


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The layer that computes with weight ``name`` (through a LoRA wrapper to its base layer)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


class _ShardWriter:
    """safetensors files of at most ``shard_bytes`` each, named and indexed as transformers
    names them (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``)."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.out / f"shard-{len(self.files):05d}.safetensors"),
                  metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.out / "shard-00000.safetensors").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"shard-{i:05d}.safetensors").rename(self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_for_merge(run_dir: Path, dtype: torch.dtype, device: Optional[torch.device] = None) -> nn.Module:
    """The run's base in 4 bits, as training loaded it, with its adapter injected: the
    transformers model whose LoRA layers ``write_merged`` folds in."""
    from peft import PeftModel

    cfg = _run_config(run_dir)
    device = device or merge_device(cfg, dtype)
    base = load_base(cfg.model, cfg.quant, dtype, device, prepare_for_training=False)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval().get_base_model()


def write_merged(model: nn.Module, out: Path, dtype: torch.dtype, tokenizer=None,
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Stream ``model``'s merged weights into a transformers model directory at ``out``.

    Written into a temporary directory beside ``out`` and renamed into place at the end: a
    merge that fails (a full disk, a killed process) leaves no half-written model behind.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, shard_bytes)
        conv1d = conv1d_weights(model.config)
        with torch.no_grad():
            for name, tensor in _merged_tensors(model):
                if name in conv1d and is_4bit(_owner(model, name)):
                    tensor = tensor.t()  # Conv1D's layout (in, out), quantized as (out, in)
                cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
                writer.add(name, cast.to("cpu"))
                del tensor, cast
        writer.close()
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        config.use_cache = True
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merge_run(run_dir: Path, out: Optional[Path] = None, dtype: str = "bf16",
              shard_bytes: int = SHARD_BYTES, device: Optional[torch.device] = None) -> Path:
    """Write ``out`` (default ``run_dir/merged``) loadable by AutoModelForCausalLM."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ExportError(f"dtype={dtype!r} is not allowed; choose one of: bf16, fp16, fp32")
    cfg = _run_config(run_dir)
    model = load_for_merge(run_dir, DTYPES[dtype], device)
    return write_merged(model, Path(out or run_dir / "merged"), DTYPES[dtype], load_tokenizer(cfg.model),
                        shard_bytes)
