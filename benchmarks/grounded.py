"""An input-grounded workload: "repeat / copy / rewrite this passage" prompts over passages of the
repo's own prose (grounded_passages.txt: the README's paragraphs as of 2026-12-07, frozen so the
workload does not change with the README), where the answer reuses the input (what n-gram
speculation exploits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.workloads import Workload, uniform_lengths
from models.loading.tokenizer import Tokenizer

SOURCE = Path(__file__).resolve().parent / "grounded_passages.txt"
INSTRUCTIONS = ("Repeat the following passage exactly, word for word.",
                "Copy the following passage, fixing any typos you find.",
                "Rewrite the following passage as one paragraph, keeping its words.")
TEMPLATE_TOKENS = 48  # the chat template and the instruction: the passage gets the rest of isl


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown text: no code blocks, tables or headings."""
    out, in_code = [], False
    for block in text.split("\n\n"):
        if block.count("```") % 2:
            in_code = not in_code
            continue
        first = block.lstrip()
        if in_code or not first or first[0] in "#|`-<" or "```" in block:
            continue
        out.append(" ".join(block.split()))
    return out


def grounded_prompts(tokenizer: Tokenizer, n: int, isl: int, seed: int) -> list[list[int]]:
    """n chat prompts of about `isl` tokens: an instruction and consecutive README paragraphs."""
    paras = paragraphs(SOURCE.read_text())
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        i, passage = int(rng.integers(len(paras))), ""
        while len(tokenizer.encode(passage)) < isl - TEMPLATE_TOKENS:
            passage += ("\n\n" if passage else "") + paras[i % len(paras)]
            i += 1
        passage = tokenizer.decode(tokenizer.encode(passage)[:isl - TEMPLATE_TOKENS])
        instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        prompts.append(list(tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{passage}"}])))
    return prompts


def grounded_workload(tokenizer: Tokenizer, seed: int, n: int, isl: int, osl: int, ratio: float,
                      stream: int = 0) -> Workload:
    """README-passage prompts of about isl tokens; output lengths as make_workload's."""
    rng = np.random.default_rng([seed, stream])
    output_lens = [int(x) for x in uniform_lengths(rng, n, osl, ratio)]
    return Workload(grounded_prompts(tokenizer, n, isl, int(rng.integers(2**31))), output_lens)
