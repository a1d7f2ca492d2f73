"""Formats and prompt masking, packing, the cache, the deterministic sampler, and refusing
malformed data with file:line (row N for Parquet/CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import ASSETS_DIR, DataConfig, ModelConfig
from orchestrator.data import (
    IGNORE_INDEX, DataError, StepSampler, check_rows, collate, collate_packed, eval_shard,
    load_examples, model_inputs, prepare,
)
from orchestrator.model import load_tokenizer

TINY = str(ASSETS_DIR / "tiny-llama")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path=TINY))


def _write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_labels_mask_prompt_and_padding(tokenizer, tmp_path) -> None:
    rows = [{"instruction": "Reverse the word.", "input": "mango", "output": "ognam"},
            {"instruction": "Add the numbers.", "input": "", "output": "12"}]
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(r) for r in rows]), max_seq_len=128)
    examples = load_examples(cfg.path, tokenizer, cfg)
    batch = collate(examples, tokenizer.pad_token_id)
    for i, (row, ex) in enumerate(zip(rows, examples)):
        prompt_len = len(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
        target = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = batch["labels"][i].tolist()
        n = len(ex.input_ids)
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len           # prompt masked
        assert labels[prompt_len:n] == target                                 # response + EOS kept
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)               # padding masked
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(labels) - n)
    # Without an input the template has no Input section.
    assert "### Input" not in examples[1].prompt


def test_train_on_prompt_keeps_prompt_labels(tokenizer, tmp_path) -> None:
    row = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(row)]), train_on_prompt=True)
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    assert ex.labels == ex.input_ids


def test_sampler_same_global_batch_for_any_world() -> None:
    one = StepSampler(100, global_batch=8, micro_batch=8, world=1, rank=0, seed=3)
    two = [StepSampler(100, global_batch=8, micro_batch=2, world=2, rank=r, seed=3) for r in range(2)]
    for step in range(30):  # crosses epoch boundaries (12 steps per epoch)
        whole = [i for mb in one.micro_batches(step) for i in mb]
        parts = [i for s in two for mb in s.micro_batches(step) for i in mb]
        assert whole == parts
        assert all(len(mb) == 2 for mb in two[0].micro_batches(step))
    epoch0 = [i for s in range(12) for i in one.micro_batches(s)[0]]
    assert len(set(epoch0)) == 96  # no repeats within an epoch


def test_micro_batch_seeds_follow_the_examples_not_the_rank() -> None:
    """Dropout draws from each micro-batch's seed (data/batches.py): two ranks with micro-batch
    2 and one rank with the same micro-batch size hold the same micro-batches with the same
    seeds at every step, while another step, run seed or order of examples gets another seed."""
    from orchestrator.data.batches import Batches, draw_seed

    def batches(world: int, rank: int, seed: int = 3) -> Batches:
        return Batches(StepSampler(100, 8, 2, world, rank, seed), lambda mb: {"ids": mb})

    one, two = batches(1, 0), [batches(2, r) for r in range(2)]
    for step in range(1, 14):
        whole = [(m.seed, m.tensors["ids"]) for m in one.micro_batches(step)]
        assert whole == [(m.seed, m.tensors["ids"]) for b in two for m in b.micro_batches(step)]
        assert len({seed for seed, _ in whole}) == len(whole) == 4
    first = one.micro_batches(1)[0]
    assert first.seed == draw_seed(3, 1, first.tensors["ids"])
    assert len({first.seed, draw_seed(3, 2, first.tensors["ids"]), draw_seed(4, 1, first.tensors["ids"]),
                draw_seed(3, 1, first.tensors["ids"][::-1])}) == 4


def test_eval_shard_pads_to_equal_length() -> None:
    shards = [eval_shard(5, 2, r) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, None]]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], "data.jsonl:2: invalid JSON"),
        (['{"instruction": "a"}'], "data.jsonl:1: missing field 'output'"),
        (['{"instruction": "a", "output": 3}'], "data.jsonl:1: field 'output' must be a string, got int"),
        (['[1, 2]'], "data.jsonl:1: expected a JSON object, got list"),
        ([''], "data.jsonl: no rows"),
    ],
)
def test_malformed_rows_name_file_line_reason(tmp_path, lines, message) -> None:
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=message):
        check_rows(path, DataConfig(path=path))


def test_malformed_data_refused_by_cli(tmp_path) -> None:
    from conftest import orchestrate

    path = _write(tmp_path, ['{"instruction": "a", "output": "b"}', "not json"])
    proc = orchestrate("train", f"data.path={path}", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data.path: {path}:2: invalid JSON (Expecting value)"
    assert not (tmp_path / "run").exists()


TINY_TRAIN = ASSETS_DIR / "tiny_instruct" / "train.jsonl"


def _tiny_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in TINY_TRAIN.read_text().splitlines()[:n]]


def _trained_text(tokenizer, ex) -> str:
    return tokenizer.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_chat_labels_only_on_assistant_turns(tokenizer, tmp_path) -> None:
    conv = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse tour"}, {"role": "assistant", "content": "ruot"},
        {"role": "user", "content": "Uppercase open"}, {"role": "assistant", "content": "OPEN"},
    ]}
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(conv)]), format="chat", max_seq_len=256)
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    # The tiny template writes no EOS, so one follows the last assistant turn (trained).
    assert _trained_text(tokenizer, ex) == "ruot\n\nOPEN\n\n</s>"
    assert tokenizer.decode(ex.input_ids).startswith("<s>### system:\nAnswer briefly.")
    assert tokenizer.decode(ex.prompt_ids).endswith("### user:\nUppercase open\n\n### assistant:\n")
    assert ex.target == "OPEN"
    batch = collate([ex, ex], tokenizer.pad_token_id)
    assert batch["labels"][0].tolist() == ex.labels


def test_chat_template_from_config(tokenizer, tmp_path) -> None:
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(conv)]), format="chat", chat_template=str(template))
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    assert tokenizer.decode(ex.input_ids) == "<s><user>hi<assistant>yo</s>"
    assert _trained_text(tokenizer, ex) == "yo</s>"
    # The template's text, not its file name, keys the cache: editing the file re-tokenizes.
    cached = DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "cache")})
    assert not prepare(cached, tokenizer).cache_hit and prepare(cached, tokenizer).cache_hit
    template.write_text(template.read_text().replace("<assistant>{% endif %}", "<bot>{% endif %}")
                        .replace("<{{ m['role'] }}>", "<{{ 'bot' if m['role'] == 'assistant' else m['role'] }}>"))
    edited = prepare(cached, tokenizer)
    assert not edited.cache_hit
    assert tokenizer.decode(edited.train[0].input_ids) == "<s><user>hi<bot>yo</s>"


def test_text_format_trains_on_everything(tokenizer, tmp_path) -> None:
    cfg = DataConfig(path=_write(tmp_path, [json.dumps({"text": "the cat sat"})]), format="text")
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    assert ex.labels == ex.input_ids and tokenizer.decode(ex.input_ids) == "<s>the cat sat</s>"


@pytest.mark.parametrize("policy", ["right", "left", "drop"])
def test_truncation_policies(tokenizer, tmp_path, policy) -> None:
    rows = [{"instruction": "Reverse the word.", "input": "x" * 10, "output": "y" * 40},
            {"instruction": "a", "output": "b"}]
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(r) for r in rows]), max_seq_len=90, truncation=policy)
    examples = load_examples(cfg.path, tokenizer, cfg)
    if policy == "drop":
        assert len(examples) == 1 and tokenizer.decode(examples[0].input_ids).endswith("b</s>")
        return
    long = examples[0]
    assert len(long.input_ids) == len(long.labels) == 90
    text = tokenizer.decode(long.input_ids)
    assert text.endswith("y" * 40 + "</s>") if policy == "left" else text.startswith("<s>### Instruction")


def test_parquet_csv_and_shard_directory_read_the_same(tokenizer, tmp_path) -> None:
    import pandas as pd

    rows = _tiny_rows(12) + [{"instruction": "Add the numbers.", "input": "", "output": "12"}]
    ref = load_examples(_write(tmp_path, [json.dumps(r) for r in rows]), tokenizer, DataConfig(path="x"))
    df = pd.DataFrame(rows)
    df.to_parquet(tmp_path / "d.parquet")
    df.to_csv(tmp_path / "d.csv", index=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    df[:5].to_parquet(shards / "part-0.parquet")
    df[5:].to_parquet(shards / "part-1.parquet")
    for path in (tmp_path / "d.parquet", tmp_path / "d.csv", shards):
        cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
        assert load_examples(cfg.path, tokenizer, cfg) == ref, path


@pytest.mark.parametrize(
    "fmt, rows, message",
    [
        ("parquet", [{"instruction": "a", "output": 3}], r"d.parquet: row 1: field 'output' must be a string, got int"),
        ("csv", [{"instruction": "a", "answer": "b"}], r"d.csv: row 1: missing field 'output'"),
        ("jsonl-chat", [{"messages": [{"role": "user", "content": "hi"}]}], r"data.jsonl:1: no assistant message"),
        ("jsonl-chat", [{"messages": "hi"}], r"data.jsonl:1: field 'messages' must be a non-empty list"),
        ("jsonl-chat", [{"messages": [{"role": "user", "content": 5}]}], r"data.jsonl:1: message 0 needs a string 'content', got int"),
        ("jsonl-text", [{"text": ["a"]}], r"data.jsonl:1: field 'text' must be a string, got list"),
    ],
)
def test_malformed_rows_in_other_files_and_formats(tokenizer, tmp_path, fmt, rows, message) -> None:
    import pandas as pd

    if fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path := tmp_path / "d.parquet")
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path := tmp_path / "d.csv", index=False)
    else:
        path = _write(tmp_path, [json.dumps(r) for r in rows])
    cfg = DataConfig(path=str(path), format=fmt.split("-")[-1] if "-" in fmt else "alpaca",
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        prepare(cfg, tokenizer)


def test_empty_and_unsupported_files(tokenizer, tmp_path) -> None:
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "d.txt").write_text("hello")
    for name, message in (("e.csv", "e.csv: no rows"), ("d.txt", "unsupported file type '.txt'")):
        with pytest.raises(DataError, match=message):
            prepare(DataConfig(path=str(tmp_path / name), cache_dir=str(tmp_path / "c")), tokenizer)


def test_skip_bad_rows_counts_them(tokenizer, tmp_path) -> None:
    lines = [json.dumps(r) for r in _tiny_rows(5)] + ["{oops", '{"instruction": "a"}', "[1]"]
    cfg = DataConfig(path=_write(tmp_path, lines), on_bad_row="skip", cache_dir=str(tmp_path / "c"))
    splits = prepare(cfg, tokenizer)
    assert len(splits.train) == 5
    assert splits.stats["train"]["skipped_rows"] == 3
    assert splits.stats["train"]["skipped_first"][0].endswith("data.jsonl:6: invalid JSON (Expecting property name enclosed in double quotes)")
    from orchestrator.data import describe

    assert "3 malformed rows skipped (first: " in describe(splits)[0]


def test_cache_hit_and_invalidation(tokenizer, tmp_path) -> None:
    path = _write(tmp_path, [json.dumps(r) for r in _tiny_rows(20)])
    cfg = DataConfig(path=path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.25)
    first = prepare(cfg, tokenizer)
    again = prepare(cfg, tokenizer)
    assert not first.cache_hit and again.cache_hit and first.fingerprint == again.fingerprint
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert list(again.train) == list(first.train) and list(again.eval) == list(first.eval)
    # Packing changes no token: same entry. A tokenization setting or the file bytes: a new one.
    assert prepare(DataConfig(**{**cfg.__dict__, "packing": True}), tokenizer).cache_hit
    assert not prepare(DataConfig(**{**cfg.__dict__, "max_seq_len": 100}), tokenizer).cache_hit
    Path(path).write_text(Path(path).read_text() + json.dumps(_tiny_rows(21)[-1]) + "\n")
    changed = prepare(cfg, tokenizer)
    assert not changed.cache_hit and len(changed.train) + len(changed.eval) == 21


def test_sampler_position_refuses_other_data() -> None:
    s = StepSampler(100, global_batch=8, micro_batch=4, world=2, rank=1, seed=3, fingerprint="abc")
    state = s.state_dict(17)
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 5
    again = StepSampler(100, global_batch=8, micro_batch=4, world=2, rank=1, seed=3, fingerprint="abc")
    again.load_state_dict(state, 17)
    assert [again.micro_batches(k) for k in range(17, 30)] == [s.micro_batches(k) for k in range(17, 30)]
    other = StepSampler(100, global_batch=8, micro_batch=4, world=2, rank=1, seed=3, fingerprint="xyz")
    with pytest.raises(DataError, match="fingerprint: 'abc' then, 'xyz' now"):
        other.load_state_dict(state, 17)


def test_packing_rows_and_labels(tokenizer) -> None:
    cfg = DataConfig(path=str(TINY_TRAIN), max_seq_len=256, train_on_prompt=True)
    examples = load_examples(str(ASSETS_DIR / "tiny_instruct" / "eval.jsonl"), tokenizer, cfg)[:7]
    batch = collate_packed(examples, tokenizer.pad_token_id, capacity=256)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(examples)
    assert batch["input_ids"].shape[1] <= 256
    starts = (batch["position_ids"] == 0) & (batch["token_mask"] == 1)
    assert int(starts.sum()) == len(examples)
    assert (batch["labels"][starts] == IGNORE_INDEX).all()  # never predicted across a boundary
    assert int(batch["token_mask"].sum()) == sum(len(e.input_ids) for e in examples)
    padded = collate(examples, tokenizer.pad_token_id)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_one_by_one(tokenizer, attn) -> None:
    """The 4-bit QLoRA model on packed rows gives the loss of the examples run one at a time:
    no attention crosses an example boundary. Without restarting positions it would not."""
    import torch

    from orchestrator.config import LoraConfig, QuantConfig
    from orchestrator.loss import token_loss_sum
    from orchestrator.model import attach_lora, load_base

    cfg = DataConfig(path=str(TINY_TRAIN), max_seq_len=256, train_on_prompt=True)
    examples = load_examples(str(ASSETS_DIR / "tiny_instruct" / "eval.jsonl"), tokenizer, cfg)[:6]
    model = load_base(ModelConfig(path=TINY, attn_implementation=attn), QuantConfig(), torch.float32,
                      torch.device("cpu"))
    model = attach_lora(model, LoraConfig(dropout=0.0)).eval()

    def loss(batch: dict) -> float:
        return float(token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])[0])

    with torch.no_grad():
        one_by_one = sum(loss(collate([e], tokenizer.pad_token_id)) for e in examples)
        batch = collate_packed(examples, tokenizer.pad_token_id, capacity=256)
        packed = loss(batch)
        leaky = loss({k: v for k, v in batch.items() if k != "position_ids"})
    assert batch["input_ids"].shape[0] < len(examples)
    assert abs(packed - one_by_one) <= 1e-5 * one_by_one, (packed, one_by_one)
    assert abs(leaky - one_by_one) > 1e-2 * one_by_one


def test_sharegpt_and_mapped_layouts_train_exactly_as_messages(tokenizer, tmp_path) -> None:
    """ShareGPT rows (conversations, from/value, human/gpt) and a layout of the user's own
    (data.role_field / content_field / role_map) give the tokens and masks of the same
    conversation as role/content messages, under several chat templates."""
    from chat_templates import TEMPLATES

    turns = [("system", "Answer briefly."), ("user", "Reverse tour"), ("assistant", "ruot"),
             ("user", "Uppercase open"), ("assistant", "OPEN")]
    messages = {"messages": [{"role": r, "content": c} for r, c in turns]}
    sharegpt_names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = {"conversations": [{"from": sharegpt_names[r], "value": c} for r, c in turns]}
    own = {"dialog": [{"speaker": {"user": "person", "assistant": "bot"}.get(r, r), "text": c} for r, c in turns]}
    own_cfg = {"messages_field": "dialog", "role_field": "speaker", "content_field": "text",
               "role_map": {"person": "user", "bot": "assistant"}}
    for template in (None, TEMPLATES["chatml"], TEMPLATES["llama3"]):
        def examples(row: dict, name: str, **settings) -> tuple:
            path = tmp_path / f"{name}.jsonl"
            path.write_text(json.dumps(row) + "\n")
            cfg = DataConfig(path=str(path), format="chat", max_seq_len=256, chat_template=template, **settings)
            (ex,) = load_examples(cfg.path, tokenizer, cfg)
            return ex.input_ids, ex.labels, ex.prompt_ids, ex.target

        reference = examples(messages, "messages")
        assert examples(sharegpt, "sharegpt") == reference
        assert examples(own, "own", **own_cfg) == reference
    # What a row without a recognisable conversation is told.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"speaker": "bot", "text": "hi"}]}) + "\n"
                   + json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: message 0 needs a string 'role'.*data.role_field"):
        check_rows(str(bad), DataConfig(path=str(bad), format="chat"))
    with pytest.raises(DataError, match=r"bad.jsonl:1: no assistant message.*roles bot.*data.role_map"):
        check_rows(str(bad), DataConfig(path=str(bad), format="chat", role_field="speaker", content_field="text"))
    with pytest.raises(DataError, match=r"bad.jsonl:2: message 0 needs a string 'speaker'"):  # row 1 now passes
        check_rows(str(bad), DataConfig(path=str(bad), format="chat", role_field="speaker",
                                        content_field="text", role_map={"bot": "assistant"}))


def test_prompt_completion_rows_train_on_the_completion_only(tokenizer, tmp_path) -> None:
    """TRL's prompt/completion rows: plain ones as prompt and completion apart (the completion
    and EOS trained), conversational ones rendered as the whole conversation with only the
    completion's assistant turn trained; generate's prompt ends where the completion starts."""
    from chat_templates import TEMPLATES
    from orchestrator.data.prompt import prepare_prompt

    plain = {"prompt": "The capital of France is", "completion": " Paris."}
    cfg = DataConfig(path=_write(tmp_path, [json.dumps(plain)]), format="prompt_completion")
    (ex,) = load_examples(cfg.path, tokenizer, cfg)
    assert _trained_text(tokenizer, ex) == tokenizer.decode(
        tokenizer(" Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert prepare_prompt(cfg, tokenizer, {"prompt": plain["prompt"]}) == ex.prompt_ids
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse tour"},
             {"role": "assistant", "content": "ruot"}, {"role": "user", "content": "Uppercase open"},
             {"role": "assistant", "content": "OPEN"}]
    for template in (None, TEMPLATES["chatml"]):
        path = tmp_path / "pc.jsonl"
        path.write_text(json.dumps({"prompt": turns[:4], "completion": turns[4:]}) + "\n")
        pc = DataConfig(path=str(path), format="prompt_completion", chat_template=template, max_seq_len=256)
        chat = DataConfig(path=_write(tmp_path, [json.dumps({"messages": turns})]), format="chat",
                          chat_template=template, max_seq_len=256)
        (a,), (b,) = load_examples(pc.path, tokenizer, pc), load_examples(chat.path, tokenizer, chat)
        assert a.input_ids == b.input_ids and a.prompt_ids == b.prompt_ids and a.target == "OPEN"
        trained = [i for i, lab in enumerate(a.labels) if lab != IGNORE_INDEX]
        assert trained and set(trained) < {i for i, lab in enumerate(b.labels) if lab != IGNORE_INDEX}
        assert "OPEN" in _trained_text(tokenizer, a) and "ruot" not in _trained_text(tokenizer, a)
        assert prepare_prompt(pc, tokenizer, {"prompt": turns[:4]}) == a.prompt_ids
    bad = _write(tmp_path, [json.dumps({"prompt": "x", "completion": ["y"]})])
    with pytest.raises(DataError, match=r"data.jsonl:1: fields 'prompt' and 'completion' must be two strings "
                                        r"or two lists of messages, got str and list"):
        check_rows(bad, DataConfig(path=bad, format="prompt_completion"))


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _tool_rows() -> dict[str, dict]:
    """One conversation with a tool call and its result, in OpenAI's layout (content null,
    arguments a JSON string) and in LLaMA-Factory's ShareGPT layout (function_call and
    observation turns, the tools as a JSON string)."""
    openai = {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21})},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}], "tools": TOOLS}
    sharegpt = {"conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temp": 21})},
        {"from": "gpt", "value": "It is 21 degrees in Paris."}], "tools": json.dumps(TOOLS)}
    return {"openai": openai, "sharegpt": sharegpt}


def test_tool_calls_train_the_call_not_the_result(tokenizer, tmp_path) -> None:
    """Tool calls (OpenAI's layout, the same rows through Parquet, whose schema gives every
    message every key, and LLaMA-Factory's ShareGPT layout) train token for token alike, under
    two templates with tool branches: the call and the answer are trained, the tool's result
    and the prompt are not; one render locates the turns as the prefix rule does; with
    data.roles_to_train=[assistant, tool] the result is trained too."""
    import pandas as pd

    from chat_templates import TOOL_TEMPLATES
    from orchestrator.data.chat import renderer
    from orchestrator.data.formats import conversation, row_tools

    rows = _tool_rows()
    pd.DataFrame([rows["openai"] | {"tools": json.dumps(TOOLS)}]).to_parquet(tmp_path / "openai.parquet")
    for name, template in TOOL_TEMPLATES.items():
        def examples(path: Path, **settings) -> tuple:
            cfg = DataConfig(path=str(path), format="chat", max_seq_len=2048, chat_template=template, **settings)
            (ex,) = load_examples(cfg.path, tokenizer, cfg)
            return ex.input_ids, ex.labels, ex.prompt_ids, ex.target

        paths = {}
        for layout, row in rows.items():
            paths[layout] = tmp_path / f"{layout}.jsonl"
            paths[layout].write_text(json.dumps(row) + "\n")
        reference = examples(paths["openai"])
        assert examples(paths["sharegpt"]) == reference, name
        assert examples(tmp_path / "openai.parquet") == reference, name
        ids, labels, _, target = reference
        trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        assert "get_weather" in trained and "Paris" in trained and "21 degrees" in trained, (name, trained)
        assert "temp" not in trained and "Weather in" not in trained, (name, trained)
        assert target == "It is 21 degrees in Paris."
        cfg = DataConfig(path="x", format="chat")
        messages, tools = conversation(rows["openai"], cfg, "row"), row_tools(rows["openai"], cfg, "row")
        r = renderer(template, tokenizer)
        for roles in (("assistant",), ("assistant", "tool")):
            got, want = r.render(messages, "row", tools, roles), r.by_prefixes(messages, "row", tools, roles)
            assert (got.text, got.spans, got.turns) == (want.text, want.spans, want.turns), (name, roles)
        ids, labels, _, _ = examples(paths["openai"], roles_to_train=["assistant", "tool"])
        assert "temp" in tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]), name
    bad = _write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "tool_calls": [{"type": "function"}]}]})])
    with pytest.raises(DataError, match=r"data.jsonl:1: message 1: a tool call needs a function name"):
        check_rows(bad, DataConfig(path=bad, format="chat"))
    bad = _write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": None}]})])
    with pytest.raises(DataError, match=r"message 1 needs a string 'content', got nothing \(only a message with "
                                        r"tool_calls may have none\)"):
        check_rows(bad, DataConfig(path=bad, format="chat"))


def test_mixture_counts_are_exact_seeded_and_cached(tokenizer, tmp_path) -> None:
    """Three sources in three layouts, weighted 3:2:1: the counts are exact (largest
    remainder), each drawn example is its source's own, the draw and its key are the same on a
    second preparation (read from the cache) and change with the weights; rows beyond a
    source's size repeat it evenly; eval rows come from each source's own eval settings and
    data.eval_path."""
    from orchestrator.config import ConfigError
    from orchestrator.config.data import validate_data
    from orchestrator.data.mixture import counts, draw

    assert counts([1000] * 3, [{"weight": 3}, {"weight": 2}, {"weight": 1}], 100) == [50, 33, 17]
    assert counts([100, 30, 1000], [{"weight": 1}] * 3, None) == [30, 30, 30]  # none repeats
    assert counts([5, 5], [{"rows": 12}, {"rows": 3}], None) == [12, 3]
    picks = draw(5, 12, 0, 0)
    assert sorted(picks[:5]) == list(range(5)) and sorted(picks[5:10]) == list(range(5))
    assert list(draw(5, 12, 0, 0)) == list(picks) and list(draw(5, 12, 0, 1)) != list(picks)

    rows = _tiny_rows(60)
    alpaca = _write(tmp_path, [json.dumps(r) for r in rows[:40]])
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": r["instruction"]},
                                                          {"from": "gpt", "value": r["output"]}]}) + "\n"
                            for r in rows[20:50]))
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": r["instruction"], "completion": r["output"]}) + "\n" for r in rows[40:60]))
    sources = [{"path": alpaca, "weight": 3, "eval_fraction": 0.1},
               {"path": str(chat), "format": "chat", "weight": 2},
               {"path": str(pc), "format": "prompt_completion", "weight": 1, "name": "style"}]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[50:60]))
    cfg = DataConfig(sources=sources, mixture_rows=30, eval_path=str(held), cache_dir=str(tmp_path / "cache"),
                     max_seq_len=256)
    validate_data(cfg)
    splits = prepare(cfg, tokenizer)
    assert [s["drawn"] for s in splits.stats["sources"]] == [15, 10, 5] and len(splits.train) == 30
    assert [s["examples"] for s in splits.stats["sources"]] == [36, 30, 20]
    assert splits.stats["sources"][2]["name"] == "style" and len(splits.eval) == 4 + 10
    assert sum(splits.train.lengths()) == sum(s["tokens_drawn"] for s in splits.stats["sources"])
    own = {tuple(e.input_ids) for e in load_examples(str(pc), tokenizer, DataConfig(
        path=str(pc), format="prompt_completion", max_seq_len=256))}
    from_pc = [e for e, k in zip(splits.train, splits.train._part) if k == 2]
    assert len(from_pc) == 5 and all(tuple(e.input_ids) in own for e in from_pc)
    again = prepare(cfg, tokenizer)
    assert again.cache_hit and again.fingerprint == splits.fingerprint
    assert [e.input_ids for e in again.train] == [e.input_ids for e in splits.train]
    import dataclasses

    heavier = dataclasses.replace(cfg, sources=[{**sources[0], "weight": 4}, *sources[1:]])
    assert prepare(heavier, tokenizer).fingerprint != splits.fingerprint
    repeated = prepare(dataclasses.replace(cfg, mixture_rows=None, eval_path=None, sources=[
        {"path": str(pc), "format": "prompt_completion", "rows": 50}, {"path": alpaca, "rows": 3}]), tokenizer)
    assert [s["drawn"] for s in repeated.stats["sources"]] == [50, 3]
    # What a mistaken mixture is told.
    for bad, message in (
            ({"path": alpaca, "sources": sources}, "data.path=.* and data.sources"),
            ({"sources": [{"path": alpaca, "wieght": 2}]}, r"data.sources\[0\].wieght is not a source setting"),
            ({"sources": [{"path": alpaca, "weight": 2}, {"path": alpaca, "rows": 5}]}, "every source a weight"),
            ({"sources": [{"format": "chat"}]}, r"data.sources\[0\].path is missing"),
            ({"sources": [{"path": alpaca, "format": "chatml"}]}, r"data.sources\[0\].format='chatml' is not allowed")):
        with pytest.raises(ConfigError, match=message):
            validate_data(DataConfig(**bad))
