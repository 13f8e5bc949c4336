"""The Pallas kernels' first-use self-check (pallas_kernels/selfcheck.py) and ops' gate: the cases pass
in interpret mode; broken kernels, hangs and crashes fail it; "auto" then falls back to the XLA path
with one warning and an explicit "pallas" raises; results come from the disk cache the second time.
A GPU is simulated by patching ops.is_sm90_gpu; the child processes interpret the kernels on CPU."""

import json
import logging
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from engine import attention_choice
from pallas_kernels import ops
from pallas_kernels import selfcheck

PASSED = selfcheck.KernelResult("grouped_matmul", (selfcheck.CaseResult("largest_bucket", True, 1.0, 0.0, 0.03),), 2.0)
FAILED = selfcheck.KernelResult("grouped_matmul", (selfcheck.CaseResult("largest_bucket", False, 1.0, 0.5, 0.03,
                                                                        "max abs err 0.5 > tolerance 0.03"),), 2.0)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A private result cache, no results or warnings remembered from other tests."""
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path / "cache"))
    memos = (selfcheck.result, ops._warn_fallback)  # tests may patch them over
    for memo in memos:
        memo.cache_clear()
    yield
    for memo in memos:
        memo.cache_clear()


def on_gpu(monkeypatch):
    """ops sees an H100; the self-check's child processes still interpret on this CPU."""
    monkeypatch.setattr(ops, "is_sm90_gpu", lambda: True)


def child_script(monkeypatch, tmp_path, body: str) -> None:
    """The child runs `body` (which may patch a kernel) and then the self-check's command line."""
    script = tmp_path / "child.py"
    script.write_text(f"{textwrap.dedent(body)}\nfrom pallas_kernels import selfcheck\nselfcheck.main()\n")
    monkeypatch.setattr(selfcheck, "CHILD", (sys.executable, str(script)))


def tiny_paged():
    """Padded paged-attention inputs: 2 decodes at contexts 5 and 20, 8/2 heads of 64, bf16."""
    rng = np.random.default_rng(0)
    k, v, tables, lens = selfcheck._paged_kv(rng, [5, 20], 2, 64, 16)
    return jnp.asarray(rng.normal(size=(2, 1, 8, 64)), jnp.bfloat16), k, v, tables, lens


def tiny_qkv():
    """Flash-attention inputs: 8 tokens, 4/2 heads of 64, bf16."""
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.normal(size=(1, 8, h, 64)), jnp.bfloat16) for h in (4, 2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(selfcheck.KERNELS))
def test_cases_pass_in_interpret_mode(kernel):
    results = [selfcheck.run_case(name, case, compiled=False)
               for name, case in selfcheck.KERNELS[kernel].cases(False).items()]
    assert all(r.ok and r.max_abs_err <= r.tolerance for r in results), results


# name: (kernel, the child's patch, the ops call (given impl) that must fall back, the failure it reports)
BROKEN = {
    "wrong_scale": ("paged_attention", """
        from pallas_kernels import paged_attention as pa
        original = pa.paged_attention_kernel
        pa.paged_attention_kernel = lambda *a, scale=None, **k: original(*a, scale=2 / 8, **k)
        """, lambda impl: ops.paged_attention(*tiny_paged(), impl=impl), "max abs err"),
    "unwritten_output_tile": ("flash_attention", """
        import jax.numpy as jnp
        from pallas_kernels import flash_attention as fa
        original = fa.flash_attention_kernel
        fa.flash_attention_kernel = lambda *a, **k: original(*a, **k).at[-1].set(jnp.nan)  # as interpreted
        """, lambda impl: ops.flash_attention(*tiny_qkv(), impl=impl), "non-finite"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_kernel_falls_back_to_xla_with_one_warning(name, monkeypatch, tmp_path, caplog):
    kernel, patch, call, failure = BROKEN[name]
    on_gpu(monkeypatch)
    child_script(monkeypatch, tmp_path, patch)
    with caplog.at_level(logging.WARNING):
        got = [call("auto"), call("auto")]
    warnings = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(warnings) == 1, warnings
    first_case = next(iter(selfcheck.KERNELS[kernel].cases(True)))
    assert kernel in warnings[0] and f"case {first_case}" in warnings[0] and failure in warnings[0]
    want = call("xla")
    for out in got:
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_explicit_pallas_raises_and_auto_falls_back(monkeypatch, caplog):
    on_gpu(monkeypatch)
    monkeypatch.setattr(selfcheck, "result", lambda kernel: FAILED)
    lhs, rhs = jnp.ones((8, 64)), jnp.ones((2, 64, 64))
    sizes = jnp.asarray([3, 5])
    with pytest.raises(selfcheck.SelfCheckError, match="grouped_matmul.*case largest_bucket: max abs err 0.5"):
        ops.grouped_matmul(lhs, rhs, sizes, impl="pallas")
    with caplog.at_level(logging.WARNING):
        got = ops.grouped_matmul(lhs, rhs, sizes, impl="auto")
    np.testing.assert_array_equal(got, 64.0)
    assert ops.checked_impl("grouped_matmul", "auto") == "xla"
    assert len([r for r in caplog.records if "grouped_matmul" in r.getMessage()]) == 1


def test_passed_check_runs_pallas(monkeypatch):
    on_gpu(monkeypatch)
    monkeypatch.setattr(selfcheck, "result", lambda kernel: PASSED)
    assert ops.checked_impl("grouped_matmul", "auto") == ops.checked_impl("grouped_matmul", "pallas") == "pallas"


def test_no_check_off_the_gpu(monkeypatch):
    """CPU, interpret mode and cross-lowering ("pallas" on CPU under an abstract H100) never run it."""
    monkeypatch.setattr(ops, "is_sm90_gpu", lambda: False)
    monkeypatch.setattr(selfcheck, "result", lambda kernel: pytest.fail("self-check ran off the GPU"))
    for impl in ops.IMPLS:
        assert ops.checked_impl("flash_attention", impl) == ops.resolve_impl(impl)


def test_hang_times_out_naming_the_case(monkeypatch, tmp_path):
    entered = tmp_path / "entered"
    child_script(monkeypatch, tmp_path, f"""
        import pathlib, time
        from pallas_kernels import grouped_matmul as gmm
        gmm.grouped_matmul_kernel = lambda *a, **k: pathlib.Path({str(entered)!r}).touch() or time.sleep(600)
        """)
    result = selfcheck.run_child("grouped_matmul", timeout_s=6)
    first_case = next(iter(selfcheck.KERNELS["grouped_matmul"].cases(True)))
    assert not result.ok and result.failure.startswith(f"case {first_case}: timed out after 6 s")
    assert entered.exists()  # it hung in the kernel, not before


def test_crash_is_a_failure(monkeypatch, tmp_path):
    child_script(monkeypatch, tmp_path, "import os\nos._exit(3)")
    result = selfcheck.run_child("mla_attention")
    assert not result.ok and "exited with code 3" in result.failure


def test_disk_cache_hit_starts_no_child(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(selfcheck, "run_child", lambda kernel, timeout_s: calls.append(kernel) or FAILED)
    first = selfcheck.check("grouped_matmul")
    second = selfcheck.check("grouped_matmul")
    assert calls == ["grouped_matmul"] and first == second == FAILED
    path = selfcheck.cache_path("grouped_matmul")
    assert path.parent == tmp_path / "cache" / "selfcheck" and json.loads(path.read_text()) == FAILED.to_json()
    monkeypatch.setattr(jax, "__version__", "0.0.0")  # another jax (or source, device, config): another entry
    assert selfcheck.cache_path("grouped_matmul") != path
    selfcheck.check("grouped_matmul")
    assert len(calls) == 2


def test_command_line_summary(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(selfcheck, "run_child", lambda kernel, timeout_s: PASSED)
    selfcheck.main([f"--output={tmp_path / 'summary.json'}"])
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["ok"] and list(summary["kernels"]) == list(selfcheck.KERNELS)
    assert summary["kernels"]["flash_attention"]["cases"]["largest_bucket"] == {
        "ok": True, "seconds": 1.0, "max_abs_err": 0.0, "tolerance": 0.03}
    monkeypatch.setattr(selfcheck, "run_child", lambda kernel, timeout_s: FAILED)
    with pytest.raises(SystemExit, match="1"):
        selfcheck.main([])


def test_engine_keeps_auto_on_the_gpu(monkeypatch):
    """The engine hands "auto" to the models on an H100, so each kernel's gate may fall back."""
    on_gpu(monkeypatch)
    shapes = attention_choice.AttentionShapes(8, 2, 64, "bfloat16", 16, 4, 64, 64, 32)
    assert attention_choice.choose("auto", shapes, on_mesh=False) == attention_choice.AttentionChoice("auto", "auto")
    assert attention_choice.choose("pallas", shapes, on_mesh=False).decode == "pallas"
