"""Load the frozen base (4-bit NF4/FP4 through bitsandbytes, or 16/32-bit) and attach LoRA.

The same functions serve training, adapter reloading and merging, so a reloaded adapter sees a
base prepared exactly as during training (``quant.frozen_dtype`` decides whether norms and
embeddings are upcast to fp32; logits only match when both sides do the same).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .config import LoraConfig, ModelConfig, QuantConfig

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


def quantization_config(quant: QuantConfig, compute_dtype: torch.dtype, storage_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``quant``; None for quant=none."""
    if quant.method == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


def disable_cpu_repacking(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place AVX512-BF16 weight repacking on CPU.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode under no_grad rewrites the
    packed weight into a CPU-only layout: it then crashes on out-features not divisible by 32
    or silently breaks later training (FACTS.md). Disabled everywhere so that behaviour does
    not depend on which CPU a run lands on. Returns the number of layers touched.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    compute_dtype: torch.dtype,
    device: torch.device,
    storage_dtype: Optional[torch.dtype] = None,
    prepare_for_training: bool = True,
) -> nn.Module:
    """Load the frozen base model on ``device``, quantized per ``quant``.

    ``storage_dtype`` is the dtype the packed 4-bit weights are stored in (uint8 unless a
    sharding strategy needs a float dtype); ``quant.storage_dtype`` overrides it unless auto.
    """
    from transformers import AutoModelForCausalLM

    if quant.storage_dtype != "auto":
        storage_dtype = DTYPES[quant.storage_dtype]
    storage_dtype = storage_dtype or torch.uint8
    qconfig = quantization_config(quant, compute_dtype, storage_dtype)
    kwargs = {}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path,
        dtype=compute_dtype,
        device_map={"": device},
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if qconfig is not None:
        from .families import check_coverage, coverage, quantize_linear_subclasses

        replaced = quantize_linear_subclasses(model)
        if replaced:
            log.info("quantized %d linear layers of a type bitsandbytes' replacement skips (%s, ...)",
                     len(replaced), replaced[0])
        disable_cpu_repacking(model)
        check_coverage(coverage(model), quant.method, quant.allow_unquantized)
    contiguous_head_input(model)
    if prepare_for_training:
        prepare_loaded(model, model_cfg, quantized=qconfig is not None, frozen_dtype=quant.frozen_dtype)
    else:
        model.config.use_cache = False
        model.requires_grad_(False)
    return model


def contiguous_head_input(model: nn.Module) -> None:
    """Hand the output head a contiguous input. Generation's prefill gives it a strided slice of
    the last positions (``hidden[:, -1:, :]``); torch 2.13's bf16 CPU linear cannot fold such an
    input into one matrix and multiplies batch by batch with the weight expanded per sequence,
    materialising batch x vocabulary x hidden values: +2.4 GB for 16 prompts at Qwen's 151k
    vocabulary and hidden 512 (benchmarks/RESULTS.md, #28), where the copy of the slice costs
    16 x hidden. Harmless wherever the input is already contiguous (training, the chunked loss)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module) and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else args)
        head._contiguous_input = True


def prepare_loaded(model: nn.Module, model_cfg: ModelConfig, quantized: bool,
                   frozen_dtype: str = "compute") -> None:
    """Freeze the base and prepare it for adapter training (input gradients, activation
    checkpointing, and with ``frozen_dtype=fp32`` PEFT's fp32 norms and embeddings): the same
    steps wherever the model came from, so a reloaded adapter sees the base it trained on."""
    model.config.use_cache = False
    model.requires_grad_(False)
    if quantized and frozen_dtype == "fp32":
        upcast_frozen(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def upcast_frozen(model: nn.Module) -> None:
    """PEFT's ``prepare_model_for_kbit_training`` cast: every 16-bit parameter that no 4-bit
    layer holds to fp32, but for fused MoE experts (3-D; families.py), which keep the dtype they
    were loaded in: fp32 would double the bulk of an MoE base for matmuls that autocast runs in
    the compute dtype anyway. Done here rather than by PEFT's function, which casts the experts
    too (a transient copy of the largest tensors) and whose other steps the caller does."""
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and p.dim() < 3 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)


def peft_lora_config(lora: LoraConfig, model: Optional[nn.Module] = None):
    """PEFT's LoraConfig; ``all-linear`` becomes the model's linear layers (families.py says
    why not PEFT's own ``all-linear``), or PEFT's where no model is at hand."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(lora.target_modules)
    target_modules: list[str] | str = targets
    if targets == ["all-linear"]:
        from .families import lora_target_names

        target_modules = lora_target_names(model) if model is not None else "all-linear"
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        target_parameters=list(lora.target_parameters) or None,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap the base in a PeftModel; only adapter parameters are trainable (kept in fp32)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_lora_config(lora, model), autocast_adapter_dtype=True)
    keep_input_dtype(peft_model)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" not in name and lora.bias == "none":
            raise RuntimeError(f"non-adapter parameter {name} is trainable")
    adapter = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    if lora.init_from and not any(p.is_meta for p in adapter):  # a meta skeleton is filled later
        load_adapter_weights(peft_model, lora.init_from)
    return peft_model


def keep_input_dtype(peft_model: nn.Module) -> None:
    """Let each LoRA branch of a training model take its input in the dtype it arrives in.

    PEFT casts a LoRA layer's input to the adapter weights' dtype (fp32) unless
    ``torch.is_autocast_enabled()``, which asks about CUDA only: on CPU every branch made an
    fp32 copy of its input and a dropout mask of that dtype to keep for the backward, twice
    CUDA's bytes for the same run. Set for good, not around the forward: activation
    checkpointing recomputes the forward during the backward, and a recompute that cast where
    the forward did not fails torch's metadata check. Every forward of a training model runs
    under ``compute_autocast`` (train, evaluation, generation), which casts the matmul operands
    as on CUDA; in fp32 runs input and weights already agree.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def compute_autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """The run's autocast (a no-op in fp32): every forward of a training model runs under it."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def load_adapter_weights(peft_model: nn.Module, adapter_dir: str) -> None:
    """Start the trainable adapter from a saved PEFT adapter (PEFT's own loading, every key
    accounted for: one the model lacks, or an adapter tensor left at its initial value, is an
    error rather than a silently partial start)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(adapter_dir, device="cpu")
    trainable = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise ValueError(f"lora.init_from={adapter_dir}: the adapter does not fit this model "
                         f"({(missing or unexpected)[0]} {'missing' if missing else 'unexpected'})")
    shapes = [n for n, p in trainable.items() if tuple(p.shape) != tuple(weights[n].shape)]
    if shapes:
        raise ValueError(f"lora.init_from={adapter_dir}: {shapes[0]} has shape "
                         f"{tuple(weights[shapes[0]].shape)} there, {tuple(trainable[shapes[0]].shape)} here")
    set_peft_model_state_dict(peft_model, weights)


def load_with_adapter(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    adapter_dir: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A fresh base prepared as in training with a saved PEFT adapter on top (for eval/merge)."""
    from peft import PeftModel

    base = load_base(model_cfg, quant, compute_dtype, device)
    return PeftModel.from_pretrained(base, adapter_dir)


class ForwardDtypeProbe:
    """The dtype the first adapter layer computed in, in the next forward through the model.

    It tells whether the compute dtype really reached inside the strategy's forward: a wrapper
    that turns autocast off (DeepSpeed's engine without its ``torch_autocast`` section, on CUDA)
    runs the adapters in fp32 and nothing else says so. The adapter's own weights are fp32, so
    its output is in the compute dtype only under autocast. The hook removes itself after one
    call.
    """

    def __init__(self, model: nn.Module):
        self.dtype: Optional[str] = None
        target = next((m for m in model.modules() if isinstance(m, nn.Linear)
                       and any(p.requires_grad for p in m.parameters(recurse=False))), None)
        self._handle = target.register_forward_hook(self._seen) if target is not None else None

    def _seen(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.dtype = str(output.dtype).replace("torch.", "")
        self._handle.remove()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def base_linear_storage(model: nn.Module) -> dict[str, float]:
    """What the frozen base's matmul weights (every Linear but the output head, and fused MoE
    experts, which no 4-bit layer holds) hold, per parameter, as loaded.

    Call before a strategy shards the model (with or without LoRA attached: adapter layers are
    trainable and not counted; on meta tensors only sizes are read). ``bytes_per_param`` counts
    packed weights, biases and the per-block constants (absmax; with double quantization its
    8-bit codes plus the fp32 second-level absmax and offset): the part that scales with model
    size, 0.5625 for plain 4-bit and ~0.516 with double quantization (QLoRA paper, sec. 3).
    ``bytes_per_param_with_tables`` adds the lookup tables bitsandbytes keeps per layer (a
    16-entry 4-bit map, a 256-entry map for the nested constants), a fixed ~1 KB a layer that
    is visible on small layers and vanishes on large ones.
    """
    import bitsandbytes as bnb

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    head = model.get_output_embeddings()
    params = scaled = tables = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            params += qs.shape.numel()
            scaled += nbytes(module.weight) + nbytes(qs.absmax)
            tables += nbytes(qs.code)
            if qs.nested:
                scaled += nbytes(qs.state2.absmax) + nbytes(qs.offset)
                tables += nbytes(qs.state2.code)
        elif isinstance(module, nn.Linear) and module is not head and not module.weight.requires_grad:
            params += module.weight.numel()
            scaled += nbytes(module.weight)
        else:
            for p in module.parameters(recurse=False):  # fused MoE experts: matmul weights too
                if p.dim() >= 3 and not p.requires_grad:
                    params += p.numel()
                    scaled += nbytes(p)
            continue
        if module.bias is not None:
            scaled += nbytes(module.bias)
    per_param = (lambda b: b / params) if params else (lambda b: float("nan"))
    return {"params": params, "bytes_per_param": per_param(scaled),
            "bytes_per_param_with_tables": per_param(scaled + tables)}


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or model_cfg.path, trust_remote_code=model_cfg.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
