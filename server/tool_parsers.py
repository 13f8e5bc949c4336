"""Tool-call parsers: a model's output text split into content and the function calls it makes.

One class per output format, as vLLM's `--tool-call-parser` names them: `hermes` (Qwen3 and Hermes:
`<tool_call>{"name", "arguments"}</tool_call>`), `llama3_json` (Llama 3.x: `{"name", "parameters"}`
objects separated by `;`, the whole output or after `<|python_tag|>`), `openai` (gpt-oss harmony:
`<|channel|>commentary to=functions.NAME ... <|message|>{args}<|call|>`), `deepseek_v3`
(`<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`). `NamedCall` and `RequiredCalls` read the JSON
that a grammar forces for `tool_choice` named or "required" (vLLM's schemas: their `grammar`).

Every parser is a pure function of the text: `parse` returns the content (all the text outside the
calls) and the calls; a call whose JSON does not parse stays in the content as the model wrote it,
never dropped. `settled(text)` is how much of a partial output no continuation can change (it ends
before an unclosed call or a marker's first characters), so a stream parses only that prefix and
its deltas add up to `parse` of the whole output (server/chat_output.py).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed function call; `arguments` is its JSON object's text (json.dumps of the parsed object)."""

    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Parsed:
    """An output's content (the text outside its calls) and its calls, in order."""

    content: str
    calls: tuple[ToolCall, ...] = ()


def held(text: str, *markers: str) -> int:
    """The length of the longest end of `text` that could be the start of one of `markers` (it waits
    for the next characters before it counts as text)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def tool_call(name: Any, arguments: Any) -> ToolCall | None:
    """A call from parsed JSON: a str name and an object of arguments (or its JSON text); None otherwise."""
    if isinstance(arguments, str):
        arguments = loads(arguments)
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def loads(text: str) -> Any:
    """The JSON value `text` holds, or None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolParser(abc.ABC):
    """Splits an output into content and calls; `parse` and `settled` read nothing but the text
    (a format's parser serves every request; a forced call's is made per request)."""

    name: ClassVar[str]
    # False: the output is decoded with its special tokens (the markers of some formats are special).
    skip_special_tokens: ClassVar[bool] = False
    grammar: dict | None = None  # a forced call's JSON schema, which the output is held to

    @abc.abstractmethod
    def parse(self, text: str) -> Parsed:
        """The content and the calls of a whole output."""

    @abc.abstractmethod
    def settled(self, text: str) -> int:
        """A prefix length of a partial output whose parse is a prefix of every continuation's."""


class TaggedToolParser(ToolParser):
    """Calls inside `start` ... `end` blocks (an unclosed block at the end of the output counts:
    the model may stop on its EOS instead); the text around them is content."""

    start: ClassVar[str]
    end: ClassVar[str]

    @abc.abstractmethod
    def block_calls(self, body: str) -> list[ToolCall] | None:
        """The calls one block holds, or None when it does not parse (it stays text)."""

    def _blocks(self, text: str) -> list[tuple[int, int, int]]:
        """Each block's (start, body end, end) in order; an unclosed one ends the text."""
        blocks, pos = [], 0
        while (i := text.find(self.start, pos)) >= 0:
            j = text.find(self.end, i + len(self.start))
            blocks.append((i, j, j + len(self.end)) if j >= 0 else (i, len(text), len(text)))
            pos = blocks[-1][2]
        return blocks

    def parse(self, text: str) -> Parsed:
        """Content: the text between blocks and every block that does not parse; calls: the rest."""
        content, calls, pos = [], [], 0
        for i, body_end, end in self._blocks(text):
            found = self.block_calls(text[i + len(self.start):body_end])
            content.append(text[pos:i] if found is not None else text[pos:end])
            calls += found or []
            pos = end
        return Parsed("".join(content) + text[pos:], tuple(calls))

    def settled(self, text: str) -> int:
        """Up to an unclosed block, or before a start marker's first characters."""
        blocks = self._blocks(text)
        if blocks and text.find(self.end, blocks[-1][0]) < 0:
            return blocks[-1][0]
        return len(text) - held(text, self.start)


class HermesToolParser(TaggedToolParser):
    """Qwen3 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one call each."""

    name, start, end = "hermes", "<tool_call>", "</tool_call>"

    def block_calls(self, body: str) -> list[ToolCall] | None:
        """The block's one JSON object as a call."""
        value = loads(body)
        if not isinstance(value, dict):
            return None
        call = tool_call(value.get("name"), value.get("arguments", value.get("parameters", {})))
        return None if call is None else [call]


class DeepSeekV3ToolParser(TaggedToolParser):
    """DeepSeek-V3: `<｜tool▁calls▁begin｜>`, then per call
    `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{args}\\n```<｜tool▁call▁end｜>`,
    then `<｜tool▁calls▁end｜>`."""

    name, start, end = "deepseek_v3", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    _CALL = re.compile(r"\s*<｜tool▁call▁begin｜>function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*?)\n```"
                       r"\s*<｜tool▁call▁end｜>\s*", re.S)

    def block_calls(self, body: str) -> list[ToolCall] | None:
        """Every call of the block, which holds nothing else."""
        calls, pos = [], 0
        while pos < len(body) and (m := self._CALL.match(body, pos)):
            calls.append(tool_call(m[1].strip(), loads(m[2])))
            pos = m.end()
        return calls if calls and pos == len(body) and None not in calls else None


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}` objects separated by `;`, making up
    the whole output or all of it after `<|python_tag|>` (the text before the tag is content)."""

    name = "llama3_json"
    TAG: ClassVar[str] = "<|python_tag|>"

    def _calls_start(self, text: str) -> int | None:
        """Where the calls would begin: the tag, or the output's first `{`; None: plain text."""
        if self.TAG in text:
            return text.index(self.TAG)
        return 0 if text.lstrip().startswith("{") else None

    def parse(self, text: str) -> Parsed:
        """All of the calls part parses, or the whole output is content."""
        start = self._calls_start(text)
        calls = None if start is None else self._calls(text[start:].removeprefix(self.TAG))
        return Parsed(text) if calls is None else Parsed(text[:start], tuple(calls))

    def settled(self, text: str) -> int:
        """Before the calls part (it parses whole or not at all), blank text, or a partial tag."""
        start = self._calls_start(text)
        if start is not None:
            return start
        return 0 if not text.strip() else len(text) - held(text, self.TAG)

    @staticmethod
    def _calls(text: str) -> list[ToolCall] | None:
        """The `;`-separated JSON objects of `text` as calls; None unless all of it is calls."""
        decoder, calls, pos = json.JSONDecoder(), [], 0
        text = text.strip()
        while pos < len(text):
            try:
                value, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            call = tool_call(value.get("name"), value.get("parameters", value.get("arguments", {}))) \
                if isinstance(value, dict) else None
            if call is None:
                return None
            calls.append(call)
            while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
                pos += 1
        return calls or None


# gpt-oss harmony: a message is [<|start|>ROLE]<|channel|>HEADER<|message|>BODY, ended by <|end|>,
# <|call|> or <|return|> (EOS ids, which the engine leaves out of the text: then the output's end),
# or by the next message's <|start|>. ROLE or HEADER may name a recipient (`to=functions.NAME`).
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>",
                   "<|constrain|>")
_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclasses.dataclass(frozen=True)
class HarmonyMessage:
    """One harmony message of an output: text[start:end] (its end marker included), its channel
    header, body and recipient (None: the user's)."""

    start: int
    end: int
    header: str
    body: str
    recipient: str | None

    @property
    def channel(self) -> str:
        """The header's first word: analysis, commentary or final."""
        return self.header.split(maxsplit=1)[0] if self.header.strip() else ""


def harmony_messages(text: str, pos: int = 0) -> list[HarmonyMessage]:
    """The messages of `text` from `pos` whose header is whole, in order (str.find, not a regex:
    a stream parses its text again at every delta)."""
    messages = []
    while (channel := text.find("<|channel|>", pos)) >= 0 and (head_end := text.find("<|message|>", channel)) >= 0:
        role_at = text.rfind("<|start|>", pos, channel)
        start = role_at if role_at >= 0 and "<|" not in text[role_at + 9:channel] else channel
        body_at = head_end + len("<|message|>")
        ends = [(i, len(e)) for e in _ENDS if (i := text.find(e, body_at)) >= 0]
        ends += [(i, 0) for i in (text.find("<|start|>", body_at),) if i >= 0]
        body_end, marker = min(ends, default=(len(text), 0))
        header = text[channel + len("<|channel|>"):head_end]
        found = _RECIPIENT.search(f"{text[start + 9:channel] if start < channel else ''} {header}")
        messages.append(HarmonyMessage(start, body_end + marker, header, text[body_at:body_end],
                                       found[1] if found else None))
        pos = body_end + marker
    return messages


def harmony_open(text: str) -> int | None:
    """Where an unended harmony message at the end of `text` starts (None: every message ended)."""
    last_end = max((text.rfind(e) + len(e) for e in _ENDS if e in text), default=0)
    starts = [i for m in ("<|start|>", "<|channel|>") if (i := text.find(m, last_end)) >= 0]
    return min(starts, default=None)


class HarmonyToolParser(ToolParser):
    """gpt-oss: each message to `functions.NAME` is a call with its body as the arguments; the rest
    of the text, as it comes (after the harmony reasoning parser: the final answer), is content."""

    name = "openai"

    def parse(self, text: str) -> Parsed:
        """Calls out of the function messages whose body is a JSON object; everything else is content."""
        content, calls, pos = [], [], 0
        for m in harmony_messages(text):
            recipient = m.recipient or ""
            call = tool_call(recipient.removeprefix("functions."), loads(m.body)) \
                if recipient.startswith("functions.") else None
            if call is not None:
                content.append(text[pos:m.start])
                calls.append(call)
                pos = m.end
        return Parsed("".join(content) + text[pos:], tuple(calls))

    def settled(self, text: str) -> int:
        """Before an unended message (it may be a call) or a marker's first characters."""
        start = harmony_open(text)
        return start if start is not None else len(text) - held(text, *HARMONY_MARKERS)


class NamedCall(ToolParser):
    """tool_choice naming a function: a grammar holds the whole output to the JSON object of its
    arguments (vLLM's named function calling), which is the call's arguments."""

    name = "named"
    skip_special_tokens = True

    def __init__(self, tool: dict):
        self.function, self.grammar = tool["function"]["name"], parameters_schema(tool)

    def parse(self, text: str) -> Parsed:
        """One call of the named function, or the text (cut short: max_tokens) as content."""
        call = tool_call(self.function, loads(text))
        return Parsed(text) if call is None else Parsed("", (call,))

    def settled(self, text: str) -> int:
        """Nothing until the output is whole (the JSON parses at its end, or not at all)."""
        return 0


class RequiredCalls(ToolParser):
    """tool_choice "required": a grammar holds the output to a JSON array of at least one
    `{"name": ..., "parameters": {...}}` of the request's tools (vLLM's schema for "required"), and
    of one only when `parallel` is False (OpenAI's parallel_tool_calls)."""

    name = "required"
    skip_special_tokens = True

    def __init__(self, tools: list[dict], parallel: bool = True):
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                   "parameters": parameters_schema(t)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        self.grammar = {"type": "array", "minItems": 1, "items": {"anyOf": calls},
                        **({} if parallel else {"maxItems": 1})}

    def parse(self, text: str) -> Parsed:
        """Every call of the array, or the text (cut short: max_tokens) as content."""
        value = loads(text)
        if not isinstance(value, list) or not value:
            return Parsed(text)
        calls = [tool_call(v.get("name"), v.get("parameters")) if isinstance(v, dict) else None for v in value]
        return Parsed(text) if None in calls else Parsed("", tuple(calls))

    def settled(self, text: str) -> int:
        """Nothing until the output is whole (the JSON parses at its end, or not at all)."""
        return 0


def parameters_schema(tool: dict) -> dict:
    """The JSON schema of a tool's arguments: its parameters (any object when it declares none)."""
    return tool["function"].get("parameters") or {"type": "object"}


TOOL_PARSERS: dict[str, ToolParser] = {p.name: p for p in (
    HermesToolParser(), Llama3JsonToolParser(), HarmonyToolParser(), DeepSeekV3ToolParser())}
# The format each architecture (models/registry.py) is trained on: --tool_call_parser's default.
FAMILY_TOOL_PARSERS = {"llama": "llama3_json", "qwen3": "hermes", "qwen3_moe": "hermes", "gpt_oss": "openai",
                       "deepseek_v3": "deepseek_v3"}


def get_tool_parser(name: str | None) -> ToolParser | None:
    """The parser called `name` (None or "none": no parsing); a ValueError lists the known ones."""
    if name in (None, "none"):
        return None
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r} (known: {', '.join(TOOL_PARSERS)}, none)")
    return TOOL_PARSERS[name]
