"""Randomly initialised Llama models of a chosen size that work with the embedded tokenizer.

Benchmarks need models larger than the embedded tiny one without any download: build the
architecture from a config, initialise it at random, and save it next to a copy of the tiny
model's tokenizer (vocabulary 128), so `orchestrate train model.path=DIR` runs on the embedded
tiny_instruct data. Loss values mean nothing here; memory and speed do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "orchestrator" / "assets" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

#: name -> (hidden, intermediate, layers, heads, kv_heads). Every dimension is a multiple of 32
#: (bitsandbytes' CPU kernels want that; FACTS.md).
SIZES = {
    "micro": (64, 128, 1, 2, 2),          # ~0.03M: only the runtime's own memory is left
    "50m": (768, 2048, 8, 12, 4),         # ~50M parameters
    "1b": (2048, 5632, 22, 32, 4),        # ~1.0B (TinyLlama-1.1B's shape, vocabulary 128)
}


def build_llama(out_dir: Path, size: str, seed: int = 0) -> Path:
    """Save a random ``size`` Llama (bf16 safetensors + config.json + tokenizer) in ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[size]
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tiny = LlamaConfig.from_pretrained(TINY)
    cfg = LlamaConfig(
        vocab_size=tiny.vocab_size, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1B initialises in seconds on a GPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (TINY / name).exists():
            shutil.copy(TINY / name, out_dir / name)
    return out_dir


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", choices=SIZES)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    print(build_llama(args.out_dir, args.size))
