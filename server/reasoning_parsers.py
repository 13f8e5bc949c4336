"""Reasoning parsers: a model's output text split into its reasoning and the rest (the content), as
vLLM's `--reasoning-parser` names them: `qwen3` and `deepseek_r1` (`<think>...</think>`), and
`openai_gptoss` (gpt-oss harmony: the analysis channel is reasoning, the final channel content).

As the tool parsers (server/tool_parsers.py), each is a pure function of the text: `parse` splits a
whole output and `settled` says how much of a partial one no continuation can change, so a stream
parses that prefix and its deltas add up to the whole output's parse. `inside` says that the
prompt opened the reasoning already (a chat template that ends the prompt with `<think>`), so the
output starts within it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from server.tool_parsers import HARMONY_MARKERS, harmony_messages, harmony_open, held


@dataclasses.dataclass(frozen=True)
class Reasoned:
    """An output's reasoning and the rest of it, its content (which the tool parser reads next)."""

    reasoning: str
    content: str


class ReasoningParser(abc.ABC):
    """Splits an output into reasoning and content; stateless (one instance serves every request)."""

    name: ClassVar[str]
    skip_special_tokens: ClassVar[bool] = True  # False: the format's markers are special tokens

    def starts_inside(self, prompt: str) -> bool:
        """Whether the rendered prompt leaves the output inside the reasoning."""
        return False

    @abc.abstractmethod
    def parse(self, text: str, inside: bool) -> Reasoned:
        """The reasoning and the content of a whole output."""

    @abc.abstractmethod
    def settled(self, text: str, inside: bool) -> int:
        """A prefix length of a partial output whose parse is a prefix of every continuation's."""


class ThinkReasoningParser(ReasoningParser):
    """`<think>reasoning</think>content`: the output opens with `<think>` (or the prompt did); without
    `</think>` all of it is reasoning (cut short), and an output that does not open one is content."""

    name = "qwen3"
    START: ClassVar[str] = "<think>"
    END: ClassVar[str] = "</think>"

    def starts_inside(self, prompt: str) -> bool:
        """The template ended the prompt with `<think>` (DeepSeek-R1, Qwen3 thinking-2507)."""
        return prompt.rstrip().endswith(self.START)

    def _reasoning_start(self, text: str, inside: bool) -> int | None:
        """Where the reasoning starts in the output (None: it has none)."""
        if inside:
            return 0
        opened = text.lstrip()
        return len(text) - len(opened) + len(self.START) if opened.startswith(self.START) else None

    def parse(self, text: str, inside: bool) -> Reasoned:
        """Reasoning up to `</think>`, content after it."""
        start = self._reasoning_start(text, inside)
        if start is None:
            return Reasoned("", text)
        reasoning, _, content = text[start:].partition(self.END)
        return Reasoned(reasoning, content)

    def settled(self, text: str, inside: bool) -> int:
        """Nothing while the output may still open `<think>`; in the reasoning, all but a partial `</think>`."""
        start = self._reasoning_start(text, inside)
        if start is None:
            return 0 if self.START.startswith(text.lstrip()) else len(text)
        return len(text) if self.END in text[start:] else len(text) - held(text, self.END)


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """DeepSeek-R1 and QwQ: the same tags (R1's template opens `<think>` in the prompt)."""

    name = "deepseek_r1"


class HarmonyReasoningParser(ReasoningParser):
    """gpt-oss harmony: analysis-channel messages are reasoning (joined by newlines), final and
    commentary messages' bodies content; a message to a recipient (a tool call) stays as written,
    for the tool parser; text outside messages stays too."""

    name = "openai_gptoss"
    skip_special_tokens = False

    def parse(self, text: str, inside: bool) -> Reasoned:
        """Each message's body to the reasoning or the content, by its channel."""
        reasoning, content, pos = [], [], 0
        for m in harmony_messages(text):
            content.append(text[pos:m.start])
            pos = m.end
            if m.recipient is not None:
                content.append(text[m.start:m.end])
            elif m.channel == "analysis":
                reasoning.append(m.body)
            else:
                content.append(m.body)
        return Reasoned("\n".join(reasoning), "".join(content) + text[pos:])

    def settled(self, text: str, inside: bool) -> int:
        """Through an unended message's body once its header says it has no recipient; before it otherwise."""
        start = harmony_open(text)
        if start is not None:
            opened = harmony_messages(text, start)
            if not opened or opened[0].recipient is not None:
                return start
        return len(text) - held(text, *HARMONY_MARKERS)


REASONING_PARSERS: dict[str, ReasoningParser] = {p.name: p for p in (
    ThinkReasoningParser(), DeepSeekR1ReasoningParser(), HarmonyReasoningParser())}
# vLLM parses reasoning only when --reasoning-parser names a parser, except gpt-oss, whose harmony
# channels it always splits: the same defaults here.
FAMILY_REASONING_PARSERS = {"gpt_oss": "openai_gptoss"}


def get_reasoning_parser(name: str | None) -> ReasoningParser | None:
    """The parser called `name` (None or "none": no parsing); a ValueError lists the known ones."""
    if name in (None, "none"):
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(REASONING_PARSERS)}, none)")
    return REASONING_PARSERS[name]
