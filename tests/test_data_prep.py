"""Preparation at size: chat masks from one render equal the prefix rule's on the major template
families; over-long rows are dropped and counted (or refused under data.truncation=error);
worker processes change nothing in the prepared data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from chat_templates import TEMPLATES
from orchestrator.config import ASSETS_DIR, DataConfig, ModelConfig
from orchestrator.data import IGNORE_INDEX, DataError, describe, load_examples, prepare
from orchestrator.data.chat import renderer
from orchestrator.model import load_tokenizer

TINY = str(ASSETS_DIR / "tiny-llama")
MARKERS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "<|user|>",
           "<|assistant|>", "<|system|>", "<|end|>"]


@pytest.fixture(scope="module")
def char_tokenizer():
    return load_tokenizer(ModelConfig(path=TINY))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE (GPT-2's split rules) trained here on a little text, with the families'
    turn markers as special tokens: merges across segment borders show up, unlike with the
    tiny model's character tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [json.dumps(json.loads(line)) for line in (ASSETS_DIR / "tiny_instruct" / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text * 2 + ["The quick brown fox. Hello! How can I help?"] * 50,
                            trainers.BpeTrainer(vocab_size=600, special_tokens=MARKERS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _conversations() -> list[list[dict]]:
    def conv(*pairs):
        return [{"role": r, "content": c} for r, c in pairs]

    return [
        conv(("user", "Reverse the word mango."), ("assistant", "ognam")),  # system injected or none
        conv(("system", "Answer briefly."), ("user", "What is 2+2?"), ("assistant", " 4 \n"),
             ("user", "And  3+3?"), ("assistant", "It is 6.")),
        conv(("user", "hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell a joke."),
             ("assistant", "No."), ("user", "Why?"), ("assistant", "\nBecause.")),
        conv(("assistant", "Welcome back."), ("user", "Thanks"), ("assistant", "Anything else?")),
        conv(("user", "q1"), ("assistant", "a1"), ("user", "a last question")),
    ]


def _prefix_rule(messages: list[dict], template: str, tokenizer) -> tuple[list[int], list[int]]:
    """Masking as the pipeline did before one render: every prefix rendered, each segment
    tokenized on its own. (Through the compiled template: apply_chat_template refuses the empty
    prefix before an opening assistant turn, which the template itself may render.)"""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(template)

    def render(msgs, gen):
        return compiled.render(messages=msgs, add_generation_prompt=gen, **tokenizer.special_tokens_map)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, after = render(messages[:i], True), render(messages[: i + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError("does not render conversations prefix by prefix")
            segments += [(before[len(done):], False), (after[len(before):], True)]
            done = after
    full = render(messages, False)
    if not full.startswith(done):  # the old code took full[len(done):] anyway: a garbled example
        raise DataError("does not render conversations prefix by prefix")
    segments = [s for s in segments + [(full[len(done):], False)] if s[0]]
    target = max(i for i, s in enumerate(segments) if s[1])
    add_bos = not full.startswith(tokenizer.bos_token)
    ids, labels = [], []
    for k, (text, trained) in enumerate(segments):
        t = tokenizer(text, add_special_tokens=add_bos and k == 0)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE_INDEX] * len(t)
        if k == target and tokenizer.eos_token not in full:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    return ids, labels


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_one_render_masks_equal_the_prefix_rule(family, char_tokenizer, bpe_tokenizer, tmp_path) -> None:
    template = TEMPLATES[family]
    for tokenizer in (char_tokenizer, bpe_tokenizer):
        # Templates whose turns cannot be found in one render (Phi-3 closes the last message
        # with EOS) take the prefix rule: slower, same result.
        assert renderer(template, tokenizer).one_render == (family != "phi3")
        cfg = DataConfig(path="x", format="chat", chat_template=template, max_seq_len=4096)
        compared = 0
        for n, messages in enumerate(_conversations()):
            path = _write(tmp_path / f"{n}.jsonl", [{"messages": messages}])
            try:
                want = _prefix_rule(messages, template, tokenizer)
            except Exception:
                with pytest.raises(DataError, match="chat template"):
                    load_examples(path, tokenizer, cfg)
                continue
            (ex,) = load_examples(path, tokenizer, cfg)
            # The first label is never predicted (labels shift by one); the prefix rule marks a
            # BOS trained when a trained turn opens the text, offsets place it in no turn.
            assert (ex.input_ids, ex.labels[1:]) == (want[0], want[1][1:]), (family, n)
            compared += 1
        assert compared >= (1 if family == "phi3" else 3), family  # (Phi-3: single-answer chats only)


def test_template_without_prefixes_keeps_the_clear_error(char_tokenizer, tmp_path) -> None:
    last_differs = ("{% for m in messages %}{% if loop.last %}[final]{% endif %}"
                    "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    cfg = DataConfig(path=_write(tmp_path / "c.jsonl", rows), format="chat", chat_template=last_differs)
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template does not render conversations prefix by prefix"):
        load_examples(cfg.path, char_tokenizer, cfg)


def test_long_rows_dropped_and_counted_or_refused(char_tokenizer, tmp_path) -> None:
    rows = [{"instruction": "Say yes.", "output": "yes"}] * 3
    rows[1] = {"instruction": "x" * 300, "output": "never trained"}  # the prompt alone fills 128
    path = _write(tmp_path / "a.jsonl", rows)
    cfg = DataConfig(path=path, max_seq_len=128, cache_dir=str(tmp_path / "cache"))
    splits = prepare(cfg, char_tokenizer)
    assert len(splits.train) == 2
    s = splits.stats["train"]
    assert s["dropped_too_long"] == 1 and s["dropped_first"] == [f"{path}:2: 348 tokens; no trained token fits in data.max_seq_len=128"]
    assert describe(splits)[0] == f"data train: 2 examples, 1 too long for data.max_seq_len dropped (first: {s['dropped_first'][0]})"
    with pytest.raises(DataError, match=rf"data.path: {path}:2: 348 tokens, longer than data.max_seq_len=128 \(data.truncation=error"):
        prepare(dataclasses.replace(cfg, truncation="error"), char_tokenizer)

    # Chat keeps whole turns first: the conversation ends at the last answer that fits.
    turns = [{"role": "user", "content": "q" * 20}, {"role": "assistant", "content": "first"},
             {"role": "user", "content": "r" * 20}, {"role": "assistant", "content": "second"},
             {"role": "user", "content": "s" * 200}, {"role": "assistant", "content": "third"}]
    chat = DataConfig(path=_write(tmp_path / "c.jsonl", [{"messages": turns}]), format="chat", max_seq_len=128)
    (ex,) = load_examples(chat.path, char_tokenizer, chat)
    trained = char_tokenizer.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == "first\n\nsecond\n\n</s>" and ex.target == "second" and len(ex.input_ids) <= 128
    assert char_tokenizer.decode(ex.prompt_ids).endswith("r" * 20 + "\n\n### assistant:\n")


def test_workers_change_nothing(char_tokenizer, tmp_path) -> None:
    lines = (ASSETS_DIR / "tiny_instruct" / "train.jsonl").read_text().splitlines()[:1500]
    lines[700] = "{broken"
    lines[1200] = json.dumps({"instruction": "x" * 400, "output": "y"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    base = DataConfig(path=str(path), max_seq_len=128, eval_fraction=0.1, on_bad_row="skip")
    one = prepare(dataclasses.replace(base, num_proc=1, cache_dir=str(tmp_path / "c1")), char_tokenizer)
    two = prepare(dataclasses.replace(base, num_proc=2, cache_dir=str(tmp_path / "c2")), char_tokenizer)
    assert one.fingerprint == two.fingerprint and not two.cache_hit
    assert (len(one.train), len(one.eval)) == (len(two.train), len(two.eval)) == (1348, 150)
    assert one.stats == two.stats
    assert one.stats["train"]["skipped_first"] == [f"{path}:701: invalid JSON (Expecting property name enclosed in double quotes)"]
    for a, b in ((one.train, two.train), (one.eval, two.eval)):
        assert list(a) == list(b)
    assert list(one.train.lengths()) == [len(e.input_ids) for e in one.train]
    # Strict about bad rows: the first in file order is named, and no partial entry is left.
    strict = dataclasses.replace(base, on_bad_row="error", num_proc=2, cache_dir=str(tmp_path / "c3"))
    with pytest.raises(DataError, match=rf"data.path: {path}:701: invalid JSON"):
        prepare(strict, char_tokenizer)
    assert not any((tmp_path / "c3").iterdir())
