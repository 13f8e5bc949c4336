"""What a compiled step does across devices: its collectives (from the partitioned HLO text) and
XLA's memory analysis. Used by scripts/plan_sharding.py and scripts/shard_experiment.py."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "f8e4m3fn": 1, "f8e5m2": 1}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO shape string, e.g. "(f32[8,128], bf16[4])"."""
    total = 0
    for dtype, dims in _SHAPE_RE.findall(text):
        size = _DTYPE_BYTES.get(dtype) or int(dtype[1:]) // 8
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in a partitioned HLO module.

    Bytes are each op's result on one device, summed over the ops as written (an op inside a
    loop body counts once).
    """
    out: dict[str, dict[str, int]] = {}
    for shape, op in _COLLECTIVE_RE.findall(hlo):
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += shape_bytes(shape)
    return out


def memory(compiled) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()`."""
    stats = compiled.memory_analysis()
    return {"argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
            "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes}
