"""A character-level tokenizer over printable ASCII, built offline with ``tokenizers``."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Printable ASCII (space .. ~) plus newline and tab.
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
VOCAB_MULTIPLE = 32

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\n' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ``<s>`` prepended with ``add_special_tokens=True``, never ``</s>``."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    # Pad the vocabulary so embedding and head dims are multiples of 32.
    n = 0
    while len(vocab) % VOCAB_MULTIPLE:
        vocab[f"<unused{n}>"] = len(vocab)
        n += 1

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
