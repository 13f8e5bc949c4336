"""The sm_90a compile gate's pieces that run on any jaxlib: target specs, ptxas report parsing, the
verdict on a compiled kernel, and preset meshes. The compiling itself needs jax[cuda13]
(`make gpu-check`, which CI runs: .ci/run); the script itself keeps only the wiring."""

from pathlib import Path

import pytest

from pallas_kernels import compiled_stats
from sharding import gpu_target

PTXAS = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 666 by compiler to allow use of registers in GMMA in function 'gmm_mosaic_gpu_kernel'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gmm_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for gmm_mosaic_gpu_kernel
    0 bytes stack frame, {store} bytes spill stores, {load} bytes spill loads
ptxas info    : Used {registers} registers, used 16 barriers, 1 bytes smem
"""
RESOURCES = "Resources(smem_scratch_bytes={smem}, tmem_scratch_cols=0, barrier_counts=Counter(), scoped_gmem_semaphores={{}})"


def test_targets_carry_the_spec_facts():
    h100, h200 = gpu_target.load("h100"), gpu_target.load("h200")
    assert (h100.device_kind, h100.memory_bytes, h100.num_sms) == ("NVIDIA H100 80GB HBM3", 84942979072, 132)
    assert (h200.device_kind, h200.memory_bytes) == ("NVIDIA H200 141GB HBM3e", 151397597184)
    assert h100.smem_optin_bytes == h200.smem_optin_bytes == 232448
    assert "ACCELERATED_FEATURES" in h200.spec  # sm_90a: wgmma and TMA
    with pytest.raises(ValueError, match="unknown GPU target 'b200'"):
        gpu_target.load("b200")


def write_dump(directory: Path, name: str, *, registers: int, store: int = 0, load: int = 0, smem: int = 1024):
    (directory / f"{name}.ptxas").write_text(PTXAS.format(registers=registers, store=store, load=load))
    (directory / f"{name}.resources.txt").write_text(RESOURCES.format(smem=smem))


def test_ptxas_reports_are_read_once_each(tmp_path):
    write_dump(tmp_path, "mla_decode_r64_0", registers=255, store=328, load=328, smem=229_376)
    seen: set[str] = set()
    (stats,) = compiled_stats.read(tmp_path, seen)
    assert stats == compiled_stats.KernelStats(
        "mla_decode_r64", 255, 328, 328, 229_376,
        ("C7519: warpgroup.arrive is injected in around line 666 by compiler to allow use of registers in GMMA",))
    assert compiled_stats.read(tmp_path, seen) == []  # already read
    write_dump(tmp_path, "mla_decode_r64_1", registers=128)  # the same kernel compiled again
    assert [s.registers for s in compiled_stats.read(tmp_path, seen)] == [128]


def test_a_report_without_register_line_is_an_error(tmp_path):
    (tmp_path / "k_0.ptxas").write_text("ptxas fatal: something else\n")
    with pytest.raises(ValueError, match="no register or spill line"):
        compiled_stats.read(tmp_path, set())


@pytest.mark.parametrize("stats, reason", [
    (dict(registers=168, store=0, load=0, smem=163_840), None),
    (dict(registers=255, store=328, load=0, smem=1024), "k spills (328 B stored, 0 B loaded, 255 registers)"),
    (dict(registers=64, store=0, load=4, smem=1024), "k spills (0 B stored, 4 B loaded"),
    (dict(registers=64, store=0, load=0, smem=232_449), "k uses 232449 B of SMEM, over h200's 232448 B"),
])
def test_the_gate_fails_spills_and_smem_overflow(stats, reason):
    kernel = {"call": "k(bfloat16[8])", "kernels": [
        dict(name="k", registers=stats["registers"], spill_store_bytes=stats["store"], spill_load_bytes=stats["load"],
             smem_bytes=stats["smem"], notes=())]}
    failures = compiled_stats.gate_failures(kernel, "h200", gpu_target.load("h200").smem_optin_bytes)
    assert len(failures) == (reason is not None)
    if reason:
        assert reason in failures[0] and "k(bfloat16[8])" in failures[0]


def test_preset_meshes():
    assert gpu_target.preset_mesh("llama3-8b", 1, 1) == ("llama3-8b", 1, 1)
    assert gpu_target.preset_mesh("llama3-8b", 8, 2) == ("llama3-8b", 4, 2)
    assert gpu_target.preset_mesh("deepseek-v3:1x16", 1, 1) == ("deepseek-v3", 1, 16)
    with pytest.raises(ValueError, match="must read TENSORxEXPERT"):
        gpu_target.preset_mesh("deepseek-v3:16", 1, 1)
    with pytest.raises(ValueError, match="--expert=3 must divide --devices=8"):
        gpu_target.preset_mesh("llama3-8b", 8, 3)


def test_the_table_lists_each_kernel_once_with_its_presets():
    stats = dict(registers=111, spill_store_bytes=0, spill_load_bytes=0, smem_bytes=115_712, notes=())
    step = {"kernels": [{"call": "c", "kernels": [dict(name="rpa_ab", **stats)]}]}
    reports = [{"model": m, "steps": {"decode": step, "mixed": step}} for m in ("qwen3-8b", "llama3-8b")]
    assert compiled_stats.table(reports).splitlines()[2] == "| `rpa_ab` | 111 | 0 | 115,712 | llama3-8b, qwen3-8b |"
