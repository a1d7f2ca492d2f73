"""The model's shape, from its config.json alone (no weights), and the counts that follow from it:
parameters by kind, the decoder Linears LoRA attaches to, and bitsandbytes' 4-bit bytes.

- 4-bit base: bitsandbytes packs two weights per byte; its constants are one absmax per block
  of 64 (fp32, or uint8 plus an fp32 per 256 blocks with double quantization): 0.5625 or
  0.51587 bytes per weight (FACTS.md). Every decoder Linear is quantized, the output head not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
MiB = 2**20

#: Logit values the chunked loss (orchestrator/loss.py) holds at a time: 2**24 fp32 values,
#: 64 MiB, ~110 positions at a 151k vocabulary. Here because the planner, which never imports
#: torch, must know it too.
CHUNK_ELEMENTS = 2**24
#: config.json keys by which a model transforms its logits (Gemma 2's soft-capping, Cohere's
#: scale...): the chunked loss cannot replace such a head and the plain loss runs instead.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")

#: The Linear modules of one Llama-family decoder layer (Llama, Mistral, Qwen2 share them).
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A model or config the planner cannot plan for; the message names what and why."""


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    name: str = ""
    #: Mixture of experts (Mixtral, Qwen-MoE): experts per layer, each a SwiGLU MLP of
    #: ``expert_intermediate``, ``experts_per_token`` of them per token. Fused into 3-D
    #: parameters, no 4-bit layer holds them (orchestrator/families.py): they stay in the
    #: compute dtype, and the layer has no dense MLP Linears.
    experts: int = 0
    expert_intermediate: int = 0
    experts_per_token: int = 0
    #: False when config.json transforms the logits (LOGIT_TRANSFORMS): the loss is then plain.
    plain_head: bool = True

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each Linear of one decoder layer."""
        h, i = self.hidden, self.intermediate
        attention = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                     "o_proj": (self.q_dim, h)}
        if self.experts:
            return attention
        return {**attention, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def mlp_width(self) -> int:
        """Intermediate activations per token of one layer's MLP (top-k experts' for MoE)."""
        return self.experts_per_token * self.expert_intermediate if self.experts else self.intermediate

    def expert_params(self) -> int:
        """Weights of all fused experts (gate, up and down of each), left unquantized."""
        return self.layers * self.experts * 3 * self.hidden * self.expert_intermediate

    def quantized_params(self) -> int:
        """Weights of all decoder Linears (what bitsandbytes quantizes)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, output head (unless tied), norms and biases (left unquantized)."""
        n = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        n += self.hidden * (2 * self.layers + 1)
        n += self.layers * self.experts * self.hidden  # MoE routers
        if self.qkv_bias:
            n += self.layers * (self.q_dim + 2 * self.kv_dim)
        return n

    def total_params(self) -> int:
        return self.quantized_params() + self.other_params() + self.expert_params()


_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")


def read_shape(model_path: str) -> ModelShape:
    """The shape in ``model_path/config.json`` (a transformers model directory; no weights needed)."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        raise PlanError(f"model.path={model_path!r}: no config.json there to read the model's shape from")
    cfg = json.loads(cfg_file.read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}  # multimodal wrappers keep the LM shape inside
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise PlanError(f"{cfg_file}: missing {', '.join(missing)}; the planner reads decoder-only "
                        "(Llama/Mistral/Qwen-style) configs")
    heads = cfg["num_attention_heads"]
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    return ModelShape(
        hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"], tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        name=cfg.get("_name_or_path") or Path(model_path).name,
        experts=experts,
        expert_intermediate=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if experts else 0,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        plain_head=all(cfg.get(k) in (None, 1.0) for k in LOGIT_TRANSFORMS),
    )


def lora_targets(shape: ModelShape, target_modules: list[str]) -> list[str]:
    """The decoder Linears LoRA attaches to (PEFT matches names by suffix; all-linear = all)."""
    present = [t for t in LAYER_LINEARS if t in shape.linears()]
    if list(target_modules) == ["all-linear"]:
        return present
    unknown = [t for t in target_modules if t.split(".")[-1] not in present]
    if unknown:
        raise PlanError(f"lora.target_modules={list(target_modules)!r}: the planner knows "
                        f"{', '.join(present)} or [all-linear], not {unknown[0]!r}")
    return [t for t in LAYER_LINEARS if t in {x.split('.')[-1] for x in target_modules}]


def lora_params(shape: ModelShape, targets: list[str], r: int) -> int:
    lin = shape.linears()
    return shape.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)


def nf4_bytes(n: int, double_quant: bool, blocksize: int = 64) -> float:
    """Packed 4-bit weights plus quantization constants (bitsandbytes' layout)."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        return n / 2 + blocks + math.ceil(blocks / 256) * 4
    return n / 2 + blocks * 4
