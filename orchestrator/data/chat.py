"""A conversation -> its rendered text and the character spans that are trained, from ONE render.

What is trained is defined by the prefix rule: assistant turn i is the text that rendering the
first i+1 messages adds to rendering the first i with a generation prompt. That is its content
(or its tool calls) and its end-of-turn marker, without the role header. A turn of another
trained role (data.roles_to_train) has no generation prompt to strip: it is trained from where
its content starts in the text its message adds, to that text's end. Rendering every prefix costs O(turns²)
per conversation, so instead the template renders the whole conversation once while each
message notes how much text had been written when the template first read it for its own turn:
that is where rendering the prefix before it ends. The generation prompt (the assistant header)
is the same text for every prefix, so it is rendered once per template.

This holds for the templates of the major families; it is checked once per template against the
prefix rule on probe conversations (system prompt present or injected, several turns, an
assistant turn first, a conversation ending on a user turn), and per conversation by cheap
checks (boundaries in order, the header where it belongs, the content inside its span). A
template that fails the probes is rendered prefix by prefix (slower, same result); a
conversation that fails a check falls back to the prefix rule alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

from .sources import DataError

Spans = list[tuple[int, int]]

_PROBES: list[list[tuple[str, str]]] = [
    [("user", "Hi there"), ("assistant", "Hello! How can I help?")],
    [("system", "Be brief."), ("user", "  2+2 \n"), ("assistant", " 4 \n"), ("user", "And 3+3?"),
     ("assistant", "6")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"),
     ("assistant", "f")],
    [("assistant", "Welcome."), ("user", "Thanks"), ("assistant", "Anything else?")],
    [("user", "q1"), ("assistant", "a1"), ("user", "q2")],
]


class _Seen(dict):
    """A message that logs (its index, text written so far) each time the template reads it."""

    def __init__(self, message: dict, index: int, log: "_Log") -> None:
        super().__init__(message)
        self._index = index
        self._log = log

    def __getitem__(self, key):
        self._log.events.append((self._index, self._log.written))
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._log.events.append((self._index, self._log.written))
        return super().get(key, default)


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []
        self.written = 0


@dataclass
class Rendered:
    text: str
    spans: Spans  # (start, end) of each assistant turn that renders any text, in order
    turns: list[int]  # the index of each span's message


class ChatRenderer:
    """Renders conversations with one template and locates their assistant turns."""

    def __init__(self, template: str, tokenizer) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.template = template
        self._compiled = _compile_jinja_template(template)
        self._context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # Where the first turn starts (rendering no message; some templates refuse that), and
        # the assistant header a generation prompt adds (the same after any prefix).
        self._empty: Optional[int] = None
        self._header: Optional[str] = None
        try:
            self._empty = len(self._render([], False))
        except DataError:
            pass
        for probe in ([{"role": "user", "content": "x"}], []):
            try:
                plain, prompted = self._render(probe, False), self._render(probe, True)
                if prompted.startswith(plain):  # not so where the prompt replaces a closing EOS
                    self._header = prompted[len(plain):]
                break
            except DataError:
                continue
        # Some templates write the header only inside their loop, so a conversation that opens
        # with an assistant turn has none before it: such conversations take the prefix rule.
        self._assistant_first_by_prefix = False
        self.one_render = self._header is not None and self._agrees_on_probes()

    def _render(self, messages: list[dict], generation_prompt: bool, where: str = "",
                tools: Optional[list] = None) -> str:
        try:
            return self._compiled.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=generation_prompt, **self._context)
        except Exception as exc:  # jinja raises template errors of its own kinds
            raise DataError(f"{where}: the chat template failed ({str(exc).splitlines()[0]})") from None

    def render(self, messages: list[dict], where: str, tools: Optional[list] = None,
               roles: tuple[str, ...] = ("assistant",)) -> Rendered:
        """The conversation's text and the spans of its turns of ``roles`` (with ``tools``
        offered to the template, as a row with tool calls needs)."""
        if self.one_render:
            found = self._by_one_render(messages, where, tools, roles)
            if found is not None:
                return found
        return self.by_prefixes(messages, where, tools, roles)

    def by_prefixes(self, messages: list[dict], where: str, tools: Optional[list] = None,
                    roles: tuple[str, ...] = ("assistant",)) -> Rendered:
        """The defining rule: render every prefix (with and without the assistant header)."""
        spans: Spans = []
        turns: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                continue
            assistant = m["role"] == "assistant"
            before = self._render(messages[:i], assistant, where, tools)
            after = self._render(messages[: i + 1], False, where, tools)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(f"{where}: the chat template does not render conversations prefix by prefix, "
                                "so trained turns cannot be located; use a template that does")
            begin = len(before)
            if not assistant:  # from the content on (the whole turn when it is not found)
                begin += max(0, after.find(m["content"].strip(), begin) - begin) if m["content"].strip() else 0
            if len(after) > begin:
                spans.append((begin, len(after)))
                turns.append(i)
            done = after
        full = self._render(messages, False, where, tools)
        if not full.startswith(done):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix, "
                            "so trained turns cannot be located; use a template that does")
        return Rendered(full, spans, turns)

    def _by_one_render(self, messages: list[dict], where: str, tools: Optional[list] = None,
                       roles: tuple[str, ...] = ("assistant",)) -> Optional[Rendered]:
        """Spans from one render, or None when a check fails (the caller then uses the prefixes)."""
        log = _Log()
        seen = [_Seen(m, k, log) for k, m in enumerate(messages)]
        parts = []
        try:
            for part in self._compiled.generate(messages=seen, tools=tools, documents=None,
                                                add_generation_prompt=False, **self._context):
                parts.append(part)
                log.written += len(part)
        except Exception:
            return None  # the prefix rule renders again and names the failure
        text = "".join(parts)
        starts = _turn_starts(log.events, len(messages))
        if starts is None:
            return None
        if messages[0]["role"] == "assistant" and (self._empty is None or self._assistant_first_by_prefix):
            return None
        starts[0] = self._empty or 0
        starts.append(len(text))
        if any(a > b for a, b in zip(starts, starts[1:])):
            return None
        header = self._header
        spans: Spans = []
        turns: list[int] = []
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                continue
            content = m["content"].strip()
            end = starts[i + 1]
            if m["role"] == "assistant":
                begin = starts[i] + len(header)
                if not (text.startswith(header, starts[i]) and begin <= end):
                    return None
                if content and text.find(content, begin, end) < 0:
                    return None
            else:
                begin = text.find(content, starts[i], end) if content else starts[i]
                if begin < 0:
                    return None
            if end > begin:
                spans.append((begin, end))
                turns.append(i)
        return Rendered(text, spans, turns)

    def _agrees_on_probes(self) -> bool:
        for probe in _PROBES:
            messages = [{"role": r, "content": c} for r, c in probe]
            try:
                want = self.by_prefixes(messages, "probe")
            except DataError:
                want = None
            got = self._by_one_render(messages, "probe")
            if got is None:
                continue  # such conversations fall back to the prefix rule, so they agree
            if want is None or (got.text, got.spans, got.turns) != (want.text, want.spans, want.turns):
                if probe[0][0] != "assistant":
                    return False
                self._assistant_first_by_prefix = True
        return True


def _turn_starts(events: list[tuple[int, int]], n: int) -> Optional[list[int]]:
    """Where each message's turn starts: the text written when the template first read the
    message after it last read any earlier one (reads ahead, e.g. a scan for the system prompt
    or the last user turn, come before and do not count)."""
    times: list[list[int]] = [[] for _ in range(n)]
    for t, (k, _) in enumerate(events):
        times[k].append(t)
    starts: list[int] = [0]
    latest_earlier = times[0][-1] if times[0] else -1
    for k in range(1, n):
        i = bisect.bisect_right(times[k], latest_earlier)
        if i == len(times[k]):
            return None
        starts.append(events[times[k][i]][1])
        latest_earlier = max(latest_earlier, times[k][-1])
    return starts


_RENDERERS: dict[tuple[str, str], ChatRenderer] = {}


def renderer(template: str, tokenizer) -> ChatRenderer:
    """One renderer (compiled, probed) per template and tokenizer, kept for the process."""
    key = (template, repr(sorted(tokenizer.special_tokens_map.items())))
    if key not in _RENDERERS:
        _RENDERERS[key] = ChatRenderer(template, tokenizer)
    return _RENDERERS[key]
