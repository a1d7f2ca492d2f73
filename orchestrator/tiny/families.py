"""Tiny random models of every decoder family people fine-tune, built from transformers' own
config classes with the embedded tokenizer, in a second each and offline.

    python -m orchestrator.tiny.families OUT_DIR [FAMILY ...]

For breadth rather than skill: each family's real module layout (block paths, fused or split
projections, biases, tied embeddings, Conv1D, subclassed linears, fused MoE experts), so the
tests and ``benchmarks/families.py`` exercise what a user's Falcon or Mixtral brings. Dimensions
are multiples of 32 (bitsandbytes on CPU, FACTS.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .random_llama import TINY, TOKENIZER_FILES

#: family -> (transformers config class name, settings beyond the common ones)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # q/k norms
    "phi3": ("Phi3Config", {}),  # fused qkv and gate_up
    "olmo2": ("Olmo2Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "granite": ("GraniteConfig", {}),
    "cohere": ("CohereConfig", {}),  # tied embeddings
    "gemma2": ("Gemma2Config", {"head_dim": 32}),  # refuses sdpa
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32}),
    "gpt_neox": ("GPTNeoXConfig", {}),  # blocks at gpt_neox.layers
    "gpt2": ("GPT2Config", {"n_inner": 128}),  # Conv1D, blocks at transformer.h
    "falcon": ("FalconConfig", {"num_kv_heads": 1}),  # FalconLinear, a Linear subclass
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # fused experts
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 64, "head_dim": 32}),
}
#: Families whose experts no 4-bit layer holds: they train with quant.allow_unquantized=true.
MOE = ("mixtral", "qwen3_moe")


def build(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 random ``family`` model with the embedded tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = LlamaConfig.from_pretrained(TINY)
    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{
        "vocab_size": tiny.vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 256, "bos_token_id": tiny.bos_token_id,
        "eos_token_id": tiny.eos_token_id, "pad_token_id": tiny.pad_token_id, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (TINY / name).exists():
            shutil.copy(TINY / name, out_dir / name)
    return out_dir


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args(argv)
    for family in args.families:
        print(build(family, args.out / family))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
