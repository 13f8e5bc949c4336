"""Registers, spills and shared memory of compiled Mosaic GPU kernels, read from the files Mosaic
GPU dumps while it compiles (`MOSAIC_GPU_DUMP_TO` with `MOSAIC_GPU_DUMP_PTXAS=1`): ptxas's `-v`
report (`*.ptxas`) and the kernel's SMEM scratch (`*.resources.txt`). These are the numbers the
device would report: ptxas is the same program."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"smem_scratch_bytes=(\d+)")
_NOTE = re.compile(r"ptxas info\s*: \((C\d+)\) (.*)")


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """One compiled kernel. notes: ptxas's coded remarks, e.g. C7519 (a wgmma serialized by an
    injected warpgroup.arrive), which cost speed but not correctness."""

    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int
    notes: tuple[str, ...]


def enable_dumps(directory: Path) -> None:
    """Make Mosaic GPU dump ptxas reports into `directory` (read by the compiler when it runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(directory)
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"


def read(directory: Path, skip: set[str]) -> list[KernelStats]:
    """Stats of every kernel dumped in `directory` whose dump name is not in `skip` (then added to it)."""
    stats = []
    for report in sorted(directory.glob("*.ptxas")):
        base = report.name.removesuffix(".ptxas")
        if base in skip:
            continue
        skip.add(base)
        text = report.read_text()
        resources = directory / f"{base}.resources.txt"
        smem = _SMEM.search(resources.read_text()) if resources.exists() else None
        registers, spills = _REGISTERS.search(text), _SPILLS.search(text)
        if registers is None or spills is None:
            raise ValueError(f"{report}: no register or spill line in ptxas's report")
        notes = tuple(sorted({f"{code}: {msg.split(' in function')[0].strip()}" for code, msg in _NOTE.findall(text)}))
        stats.append(KernelStats(re.sub(r"_\d+$", "", base), int(registers.group(1)), int(spills.group(1)),
                                 int(spills.group(2)), int(smem.group(1)) if smem else 0, notes))
    return stats


def gate_failures(kernel: dict, target: str, smem_limit: int) -> list[str]:
    """Why one compiled call's kernels ({"call", "kernels": [KernelStats as dicts]}) fail the
    compile gate: any spilled byte, or SMEM over the target's opt-in limit per block."""
    failures = []
    for k in kernel["kernels"]:
        if k["spill_store_bytes"] or k["spill_load_bytes"]:
            failures.append(f"{k['name']} spills ({k['spill_store_bytes']} B stored, {k['spill_load_bytes']} B loaded, "
                            f"{k['registers']} registers) in {kernel['call']}")
        if k["smem_bytes"] > smem_limit:
            failures.append(f"{k['name']} uses {k['smem_bytes']} B of SMEM, over {target}'s {smem_limit} B "
                            f"in {kernel['call']}")
    return failures


def table(reports: list[dict]) -> str:
    """A markdown table of every distinct compiled kernel in check_lowering's per-preset reports:
    registers, spills, SMEM and the presets using it."""
    rows: dict[tuple, set[str]] = {}
    for report in reports:
        for step in report["steps"].values():
            for call in step["kernels"]:
                for k in call["kernels"]:
                    key = (k["name"], k["registers"], k["spill_store_bytes"] + k["spill_load_bytes"], k["smem_bytes"])
                    rows.setdefault(key, set()).add(report["model"])
    lines = ["| kernel | registers | spill bytes | SMEM bytes | presets |", "|---|---|---|---|---|"]
    lines += [f"| `{name}` | {regs} | {spills} | {smem:,} | {', '.join(sorted(models))} |"
              for (name, regs, spills, smem), models in sorted(rows.items())]
    return "\n".join(lines)
