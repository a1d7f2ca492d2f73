"""A real-size model with a real vocabulary, and data with real length profiles, offline.

The embedded tiny model (128 tokens, 3M parameters) hides what decides memory on real runs: a
151k-token vocabulary makes the embeddings, the head and the logits the largest terms, and real
rows are not all ``data.max_seq_len`` long. This builds, with random weights (fine for memory
and speed; the model has learnt nothing):

- ``build_qwen_llama``: a Llama-architecture model of ~179M parameters (hidden 512, 8 layers,
  GQA 8/4, intermediate 1408, untied head) over Qwen2.5's 151,936-row vocabulary, with the real
  Qwen BPE tokenizer from ``real_tokenizer.py`` (needs the ``bench`` extra);
- ``write_short_rows``: Alpaca instruction rows with a lognormal length spread well under 256
  tokens (median ~50, at most ~90 with the template);
- ``write_full_chats``: multi-turn chat rows long enough that every one fills ``max_seq_len``.

    python benchmarks/real_model.py OUT_DIR     # model in OUT_DIR/model, data in OUT_DIR/*.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_tokenizer import build_qwen_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROSE = ROOT / "orchestrator" / "assets" / "tiny_instruct" / "train.jsonl"
#: (hidden, intermediate, layers, heads, kv_heads, vocab): multiples of 32 (FACTS.md).
QWEN_LLAMA = (512, 1408, 8, 8, 4, 151_936)


def build_qwen_llama(out_dir: Path, seed: int = 0) -> Path:
    """The model in ``out_dir`` (built once, reused after)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tok = build_qwen_tokenizer(out_dir)
    hidden, inter, layers, heads, kv, vocab = QWEN_LLAMA
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _words() -> list[str]:
    words: list[str] = []
    for row in map(json.loads, PROSE.read_text().splitlines()[:400]):
        words += f"{row['instruction']} {row.get('input', '')} {row['output']}".split()
    return words


def _text(rng: random.Random, words: list[str], n_words: int) -> str:
    start = rng.randrange(len(words) - n_words)
    return " ".join(words[start:start + n_words])


def write_short_rows(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Alpaca rows whose instruction and output lengths spread lognormally (all well under 256 tokens)."""
    rng, words = random.Random(seed), _words()
    with Path(path).open("w") as f:
        for _ in range(n):
            total = min(50, max(6, int(rng.lognormvariate(3.2, 0.5))))  # words, ~1.4 tokens each
            k = max(2, total // 3)
            f.write(json.dumps({"instruction": _text(rng, words, k),
                                "output": _text(rng, words, total - k)}) + "\n")
    return Path(path)


def write_full_chats(path: Path, n: int = 400, seed: int = 1) -> Path:
    """Multi-turn chats of ~400+ tokens, so every row is cut to data.max_seq_len=256."""
    rng, words = random.Random(seed), _words()
    with Path(path).open("w") as f:
        for _ in range(n):
            messages = []
            for turn in range(rng.randint(6, 10)):
                role = "user" if turn % 2 == 0 else "assistant"
                messages.append({"role": role, "content": _text(rng, words, rng.randint(40, 90))})
            if messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": _text(rng, words, 40)})
            f.write(json.dumps({"messages": messages}) + "\n")
    return Path(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    out = Path(sys.argv[1])
    model = build_qwen_llama(out / "model")
    print(model, write_short_rows(out / "short.jsonl"), write_full_chats(out / "chats.jsonl"))
