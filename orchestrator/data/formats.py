"""Rows -> text segments, each marked as trained (response) or not (prompt).

One representation for all three formats lets masking, truncation and packing be written once:
alpaca is (prompt, response), chat alternates template text and assistant turns, text is one
trained segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import DataConfig
from .sources import DataError


@dataclass
class Formatted:
    segments: list[tuple[str, bool]]  # (text, trained)
    target_index: int  # the segment exact-match evaluation compares against (the last response)
    target: str
    # Let the tokenizer add its special tokens (BOS) to the first segment.
    add_special_tokens: bool
    # Append EOS (trained) right after the target segment.
    eos_after_target: bool
    # Tokenize the segments joined, once (chat: what the model sees at inference), rather than
    # one by one (alpaca and text: prompt and response apart, as TRL does).
    whole: bool = False
    # The answer of each trained segment (chat: each assistant turn), for a cut at a turn's end.
    targets: list[str] = field(default_factory=list)


def _string(row: dict, name: str, where: str, required: bool) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def format_alpaca(row: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    """(prompt, response) of one Alpaca-style row."""
    instruction = _string(row, cfg.instruction_field, where, True)
    inp = _string(row, cfg.input_field, where, False)
    output = _string(row, cfg.output_field, where, True)
    template = cfg.prompt_template if inp else cfg.prompt_template_no_input
    return template.format(instruction=instruction, input=inp), output


def _alpaca(row: dict, cfg: DataConfig, where: str, tokenizer) -> Formatted:
    prompt, output = format_alpaca(row, cfg, where)
    return Formatted([(prompt, False), (output, True)], 1, output, True, True)


def _text(row: dict, cfg: DataConfig, where: str, tokenizer) -> Formatted:
    text = _string(row, cfg.text_field, where, True)
    if not text.strip():
        raise DataError(f"{where}: field {cfg.text_field!r} is empty")
    return Formatted([(text, True)], 0, text, True, True)


#: ShareGPT's role names (with LLaMA-Factory's sharegpt tool roles) onto the chat templates'.
#: LLaMA-Factory's function_call turn is the assistant's, its value the call as JSON.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function": "tool",
                  "function_call": "assistant"}
#: Keys of a message the templates read besides role and content (OpenAI's tool-call layout).
_PASSED = ("tool_call_id", "name", "reasoning_content")


def _json(value: object) -> object:
    """A JSON document stored as a string (LLaMA-Factory's tools, OpenAI's arguments), parsed;
    anything else as it is."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _tool_calls(calls: object, where: str, i: int) -> list[dict]:
    """OpenAI's tool_calls as the chat templates read them: {"type": "function", "function":
    {"name", "arguments"}} with the arguments a mapping (they are stored as a JSON string)."""
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: message {i}: tool_calls must be a non-empty list of calls")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: message {i}: a tool call needs a function name "
                            "({\"function\": {\"name\": ..., \"arguments\": {...}}})")
        norm = {"type": "function", "function": {"name": fn["name"], "arguments": _json(fn.get("arguments") or {})}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def _message(m: object, i: int, cfg: DataConfig, roles: dict, where: str) -> dict:
    """One message as the templates take it: role (mapped), content (a string), and, where
    present, tool calls, the tool result's call id and name. Keys whose value is null are left
    out (Arrow gives every message every key; Llama 3.1's template tests for the key)."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: message {i} must be an object with role and content, got {type(m).__name__}")
    role_key = cfg.role_field or ("from" if "from" in m and "role" not in m else "role")
    content_key = cfg.content_field or ("value" if "value" in m and "content" not in m else "content")
    role, content = m.get(role_key), m.get(content_key)
    if not isinstance(role, str):
        raise DataError(f"{where}: message {i} needs a string {role_key!r}, got "
                        f"{'nothing' if role is None else type(role).__name__} (messages are read as "
                        "role/content or ShareGPT's from/value; set data.role_field and data.content_field "
                        "for other keys)")
    out: dict = {"role": roles.get(role, role)}
    calls = m.get("tool_calls")
    if role == "function_call" and calls is None:  # LLaMA-Factory: the call is the value
        calls, content = _json(content), ""
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls, where, i)
        content = "" if content is None else content
    elif out["role"] == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise DataError(f"{where}: message {i} needs a string {content_key!r}, got "
                        f"{'nothing' if content is None else type(content).__name__} (only a message "
                        "with tool_calls may have none)")
    out["content"] = content
    for key in _PASSED:
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def conversation(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    """A row's conversation as ``{"role", "content"}`` messages with the templates' role names,
    whatever layout it came in (OpenAI/TRL messages with tool calls, ShareGPT, or
    data.role_field / data.content_field / data.role_map)."""
    name = cfg.messages_field
    if row.get(name) is None and name == "messages" and row.get("conversations") is not None:
        name = "conversations"
    messages = row.get(name)
    if messages is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages, "
                        f"got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    roles = {**SHAREGPT_ROLES, **cfg.role_map}
    return [_message(m, i, cfg, roles, where) for i, m in enumerate(messages)]


def row_tools(row: dict, cfg: DataConfig, where: str) -> Optional[list]:
    """The functions a row offers (data.tools_field: a list of JSON schemas, or that list as a
    JSON string, as LLaMA-Factory stores it), passed to the chat template as ``tools``."""
    tools = _json(row.get(cfg.tools_field))
    if tools in (None, "", []):
        return None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field {cfg.tools_field!r} must be a list of function schemas "
                        f"(objects, or that list as a JSON string), got {type(tools).__name__}")
    return tools


def check_messages(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    """The row's conversation (``conversation``), refused when nothing in it is trained."""
    messages = conversation(row, cfg, where)
    if not any(m["role"] in cfg.roles_to_train for m in messages):
        seen = sorted({m["role"] for m in messages})
        raise DataError(f"{where}: no {' or '.join(cfg.roles_to_train)} message to train on (roles "
                        f"{', '.join(seen)}; data.roles_to_train says which are trained, data.role_map "
                        "maps other names onto user/assistant/system/tool)")
    return messages


def chat_template(cfg: DataConfig, tokenizer) -> str:
    """The template to render with: data.chat_template (inline or a file), else the tokenizer's."""
    if cfg.chat_template:
        if "{" in cfg.chat_template:  # Jinja markup: an inline template
            return cfg.chat_template
        p = Path(cfg.chat_template)
        if not p.is_file():
            raise DataError(f"data.chat_template={cfg.chat_template!r}: no such file "
                            "(give a .jinja file or the template itself)")
        return p.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format=chat: the tokenizer has no chat template; "
                        "set data.chat_template to a Jinja template or a .jinja file")
    return tokenizer.chat_template


def _chat(row: dict, cfg: DataConfig, where: str, tokenizer) -> Formatted:
    """The turns of data.roles_to_train (the assistant's: content and end-of-turn marker) are the
    trained segments, located in one render of the conversation (chat.py says how, and when it
    renders prefix by prefix)."""
    return _rendered(check_messages(row, cfg, where), 0, cfg, where, tokenizer, row_tools(row, cfg, where))


def _rendered(messages: list[dict], first_trained: int, cfg: DataConfig, where: str, tokenizer,
              tools: Optional[list] = None) -> Formatted:
    """A conversation rendered with the run's template (and the row's tools); the turns of
    data.roles_to_train from message ``first_trained`` on are trained."""
    from .chat import renderer

    rendered = renderer(chat_template(cfg, tokenizer), tokenizer).render(
        messages, where, tools=tools, roles=tuple(cfg.roles_to_train))
    full = rendered.text
    segments: list[tuple[str, bool]] = []
    at = 0
    turns = [i for i in rendered.turns if i >= first_trained]
    texts = []
    for (start, end), turn in zip(rendered.spans, rendered.turns):
        if turn >= first_trained:
            segments += [(full[at:start], False), (full[start:end], True)]
            texts.append(messages[turn]["content"] or full[start:end])  # a tool call: its rendering
            at = end
    segments.append((full[at:], False))
    keep = [s for s in segments if s[0]]
    if not turns:
        raise DataError(f"{where}: no turn of data.roles_to_train={list(cfg.roles_to_train)} renders any text")
    target_index = max(i for i, s in enumerate(keep) if s[1])
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None)
    return Formatted(
        keep, target_index, texts[-1],
        add_special_tokens=not (bos and full.startswith(bos)),
        # Without an EOS in the template the model would never learn to stop.
        eos_after_target=not (eos and eos in full),
        whole=True, targets=texts,
    )


def prompt_completion(row: dict, cfg: DataConfig, where: str) -> tuple[object, object]:
    """A prompt/completion row as TRL defines it: two strings, or two lists of messages (the
    conversation and its continuation; normalized as chat messages are)."""
    prompt, completion = row.get(cfg.prompt_field), row.get(cfg.completion_field)
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if isinstance(prompt, list) and isinstance(completion, list):
        both = conversation({cfg.messages_field: [*prompt, *completion]}, cfg, where)
        prompt, completion = both[: len(prompt)], both[len(prompt):]
        if not any(m["role"] in cfg.roles_to_train for m in completion):
            raise DataError(f"{where}: field {cfg.completion_field!r} has no message of data.roles_to_train="
                            f"{list(cfg.roles_to_train)} to train on")
        return prompt, completion
    kinds = f"{type(prompt).__name__ if prompt is not None else 'nothing'} and " \
            f"{type(completion).__name__ if completion is not None else 'nothing'}"
    raise DataError(f"{where}: fields {cfg.prompt_field!r} and {cfg.completion_field!r} must be two strings "
                    f"or two lists of messages, got {kinds}")


def _prompt_completion(row: dict, cfg: DataConfig, where: str, tokenizer) -> Formatted:
    """Loss on the completion only (TRL's completion_only_loss): plain rows as prompt and
    response apart, conversational rows rendered whole with only the completion's turns trained."""
    prompt, completion = prompt_completion(row, cfg, where)
    if isinstance(prompt, str):
        return Formatted([(prompt, False), (completion, True)], 1, completion, True, True)
    return _rendered([*prompt, *completion], len(prompt), cfg, where, tokenizer, row_tools(row, cfg, where))


FORMATS = {"alpaca": _alpaca, "chat": _chat, "text": _text, "prompt_completion": _prompt_completion}


def format_row(row: dict, cfg: DataConfig, where: str, tokenizer) -> Formatted:
    return FORMATS[cfg.format](row, cfg, where, tokenizer)
