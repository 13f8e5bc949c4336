"""One chat choice's output text as the API returns it: reasoning (a reasoning parser's), tool calls
(a tool parser's, from the content the reasoning leaves) and content (the rest). Whole as a
`message`, or streamed as `delta`s: each `feed` parses only the settled prefix of the text so far
(server/tool_parsers.py), so the stream's reasoning, content and calls add up to `message`'s.

A stream sends a call whole once it has closed: its name and id first, then its arguments (a call
is known to parse only then: one that does not stays text). Beside calls, content loses its
trailing whitespace (null when nothing is left, as OpenAI sends it), so with a tool parser a
stream holds whitespace back until text follows it.
"""

from __future__ import annotations

import dataclasses
import uuid

from engine.request import SamplingParams
from engine.structured_output import StructuredOutputs
from server.protocol import ToolUse
from server.reasoning_parsers import Reasoned, ReasoningParser
from server.tool_parsers import NamedCall, Parsed, RequiredCalls, ToolCall, ToolParser


def call_id() -> str:
    """A fresh tool-call id, in OpenAI's form."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_body(call: ToolCall, id_: str) -> dict:
    """One of a message's `tool_calls`."""
    return {"id": id_, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatOutput:
    """One choice's text split by its request's parsers (None: that part is not parsed)."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None, prompt: str = ""):
        self.reasoning, self.tools = reasoning, tools
        self.inside = reasoning is not None and reasoning.starts_inside(prompt)
        self.called = False  # a call was parsed (the finish reason becomes "tool_calls")
        self._text = ""  # the stream's text so far
        self._sent = {"reasoning_content": 0, "content": 0}  # characters sent per field
        self._calls_sent = 0

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """`params` as the parsers need them: special tokens kept when a format's markers are
        special, and a forced call's grammar (compact JSON: no whitespace for a model to loop on)."""
        skip = all(p.skip_special_tokens for p in (self.reasoning, self.tools) if p is not None)
        grammar = None if self.tools is None else self.tools.grammar
        forced = {} if grammar is None else {
            "structured_outputs": StructuredOutputs(json=grammar, disable_any_whitespace=True)}
        return dataclasses.replace(params, skip_special_tokens=skip, **forced)

    def _split(self, text: str, whole: bool) -> tuple[Reasoned, Parsed]:
        """Reasoning, then content and calls, of `text` (whole: a finished output; else its settled prefix)."""
        reasoned = Reasoned("", text)
        if self.reasoning is not None:
            cut = len(text) if whole else self.reasoning.settled(text, self.inside)
            reasoned = self.reasoning.parse(text[:cut], self.inside)
        parsed = Parsed(reasoned.content)
        if self.tools is not None:
            cut = len(reasoned.content) if whole else self.tools.settled(reasoned.content)
            parsed = self.tools.parse(reasoned.content[:cut])
        self.called = self.called or bool(parsed.calls)
        return reasoned, parsed

    def message(self, text: str) -> dict:
        """The non-streamed message of a whole output."""
        reasoned, parsed = self._split(text, whole=True)
        content = (parsed.content.rstrip() or None) if parsed.calls else parsed.content
        message = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            message["reasoning_content"] = reasoned.reasoning or None
        if parsed.calls:
            message["tool_calls"] = [tool_call_body(c, call_id()) for c in parsed.calls]
        return message

    def feed(self, text: str) -> list[dict]:
        """The deltas that `text`, the output's next piece, settles."""
        self._text += text
        return self._deltas(*self._split(self._text, whole=False), whole=False)

    def finish(self) -> list[dict]:
        """The last deltas, once the output is whole."""
        return self._deltas(*self._split(self._text, whole=True), whole=True)

    def finish_reason(self, reason: str) -> str:
        """The engine's finish reason, "tool_calls" for an output that stopped after making calls."""
        return "tool_calls" if self.called and reason == "stop" else reason

    def _deltas(self, reasoned: Reasoned, parsed: Parsed, whole: bool) -> list[dict]:
        """What the stream has not sent yet of this split: reasoning, content, then new calls."""
        deltas = [d for d in (self._new("reasoning_content", reasoned.reasoning),
                              self._new("content", self._sendable(parsed, whole))) if d]
        for index in range(self._calls_sent, len(parsed.calls)):
            call = tool_call_body(parsed.calls[index], call_id())
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
        self._calls_sent = len(parsed.calls)
        return deltas

    def _sendable(self, parsed: Parsed, whole: bool) -> str:
        """The content a stream may send: with a tool parser, whitespace waits for text after it
        (trailing whitespace beside calls is no content, as `message` has it)."""
        if self.tools is None or (whole and not parsed.calls):
            return parsed.content
        return parsed.content.rstrip()

    def _new(self, field: str, value: str) -> dict:
        """A delta of `field`'s characters past those sent ({} when none)."""
        sent = self._sent[field]
        if len(value) <= sent:
            return {}
        self._sent[field] = len(value)
        return {field: value[sent:]}


def chat_output(use: ToolUse, tools: ToolParser | None, reasoning: ReasoningParser | None, prompt: str) -> ChatOutput:
    """The parsing a request asks for: a forced call reads its grammar's JSON (the grammar holds the
    output from its first token: no reasoning); "auto" the model's own format; "none" no calls."""
    if use.choice == "named":
        return ChatOutput(tools=NamedCall(next(t for t in use.tools if t["function"]["name"] == use.function)))
    if use.choice == "required":
        return ChatOutput(tools=RequiredCalls(use.tools, use.parallel))
    return ChatOutput(reasoning, tools if use.choice == "auto" else None, prompt)
