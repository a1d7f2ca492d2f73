"""A randomly initialised Llama-architecture model of any size, with the embedded tokenizer.

    python -m orchestrator.tiny.random_llama OUT_DIR --hidden 1024 --intermediate 2816 --layers 8

For what needs *size* rather than skill: memory and speed measurements (low-memory loading,
planner accuracy, GPU checks) on models larger than the embedded one, built offline in seconds.
The result loads like any local checkpoint (``model.path=OUT_DIR``); it has learnt nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build(out_dir: Path, hidden: int, intermediate: int, layers: int, heads: int = 0,
          kv_heads: int = 0, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config, bf16 safetensors and the tiny tokenizer to ``out_dir``; returns it.

    Dimensions should be multiples of 32 (bitsandbytes on CPU, see FACTS.md); heads default to
    hidden/64 (head_dim 64) with half as many key/value heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaConfig.from_pretrained(TINY)
    heads = heads or max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=tiny.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2), head_dim=hidden // heads,
        max_position_embeddings=tiny.max_position_embeddings, rms_norm_eps=tiny.rms_norm_eps,
        bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (TINY / name).exists():
            shutil.copy(TINY / name, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--intermediate", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = build(args.out_dir, args.hidden, args.intermediate, args.layers, args.heads,
                args.kv_heads, args.seed)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        n = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    print(f"{out}: {n / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
