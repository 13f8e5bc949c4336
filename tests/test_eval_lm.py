"""scripts/eval_lm.py's comparison, without lm-eval: `--backends=` runs nothing and compares the
lm-eval outputs already in --work_dir, here written by hand in lm-eval 0.4's --log_samples format
(a results_<stamp>.json with each task's config, a samples_<task>_<stamp>.jsonl per task). The
runs themselves (`make eval`) need .venv-eval, which CI does not build; docs/evaluation.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STAMP = "2026-12-07T19-42-23.629861"
# (doc_id, [loglikelihood per choice]) and (doc_id, generation)
LOGLIKELIHOODS = [(0, [-4.509335517883301, -10.774323463439941]), (1, [-7.919462203979492, -9.65266036987304, -8.7])]
GENERATIONS = [(0, " Paris"), (1, " Snow is a white color")]


def write_run(out_dir: Path, lls=LOGLIKELIHOODS, gens=GENERATIONS, tasks=("jaxserve_mc", "jaxserve_qa")) -> None:
    """One lm-eval run's output as `lm_eval --output_path out_dir --log_samples` lays it out."""
    run = out_dir / "some__model"
    run.mkdir(parents=True)
    configs = {"jaxserve_mc": {"task": "jaxserve_mc", "output_type": "multiple_choice"},
               "jaxserve_qa": {"task": "jaxserve_qa", "output_type": "generate_until"}}
    results = {"jaxserve_mc": {"alias": "jaxserve_mc", "acc,none": 0.5, "acc_stderr,none": 0.5},
               "jaxserve_qa": {"alias": "jaxserve_qa", "exact_match,none": 0.5, "exact_match_stderr,none": 0.5}}
    (run / f"results_{STAMP}.json").write_text(json.dumps(
        {"results": {t: results[t] for t in tasks}, "configs": {t: configs[t] for t in tasks}}))
    if "jaxserve_mc" in tasks:
        samples = [{"doc_id": doc, "resps": [[[str(ll), str(i == 0)]] for i, ll in enumerate(choices)],
                    "filtered_resps": [[str(ll), "False"] for ll in choices]} for doc, choices in lls]
        (run / f"samples_jaxserve_mc_{STAMP}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    if "jaxserve_qa" in tasks:
        samples = [{"doc_id": doc, "resps": [[text]], "filtered_resps": [text]} for doc, text in gens]
        (run / f"samples_jaxserve_qa_{STAMP}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def compare(tmp_path: Path, *flags: str) -> tuple[int, dict, str]:
    """scripts/eval_lm.py --backends= on tmp_path: its exit status, JSON and stdout."""
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_lm.py"), "--backends=",
                             f"--work_dir={tmp_path}", f"--output={out}", *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.exists(), result.stderr[-3000:]
    return result.returncode, json.loads(out.read_text()), result.stdout


def shifted(delta: float) -> list:
    """LOGLIKELIHOODS with `delta` added to the second choice of the second document."""
    (d0, c0), (d1, c1) = LOGLIKELIHOODS
    return [(d0, c0), (d1, [c1[0], c1[1] + delta, c1[2]])]


def test_runs_within_the_tolerance_pass(tmp_path):
    write_run(tmp_path / "server", lls=shifted(4e-5))
    write_run(tmp_path / "hf")
    rc, report, stdout = compare(tmp_path)
    assert rc == 0, stdout
    assert report["ok"] and report["problems"] == []
    assert report["max_abs_loglikelihood_diff"] == pytest.approx(4e-5, rel=1e-6)
    mc, qa = report["comparison"]["jaxserve_mc"], report["comparison"]["jaxserve_qa"]
    assert mc["num_requests"] == 5 and mc["num_over_tolerance"] == 0 and mc["greedy_flags_differ"] == 0
    row = next(r for r in mc["requests"] if r["doc_id"] == 1 and r["request"] == 1)
    assert row["hf"] == LOGLIKELIHOODS[1][1][1] and row["abs_diff"] == pytest.approx(4e-5, rel=1e-6)
    assert qa["generations_match"] and qa["requests"][1] == {"doc_id": 1, "request": 0, "server": GENERATIONS[1][1],
                                                             "hf": GENERATIONS[1][1], "match": True}
    assert report["metrics"]["hf"] == {"jaxserve_mc": {"acc": 0.5}, "jaxserve_qa": {"exact_match": 0.5}}
    assert "OK" in stdout


def test_a_loglikelihood_past_the_tolerance_fails(tmp_path):
    write_run(tmp_path / "server", lls=shifted(2e-3))
    write_run(tmp_path / "hf")
    rc, report, stdout = compare(tmp_path)
    assert rc == 1 and not report["ok"]
    assert report["comparison"]["jaxserve_mc"]["num_over_tolerance"] == 1
    assert report["problems"] == ["jaxserve_mc: 1 of 5 loglikelihoods differ by more than 0.001 (max 0.002)"]
    rc, report, _ = compare(tmp_path, "--tolerance=1e-2")  # the flag moves the bar
    assert rc == 0 and report["ok"]


def test_a_different_generation_fails(tmp_path):
    write_run(tmp_path / "server", gens=[(0, " Paris"), (1, " Snow")])
    write_run(tmp_path / "hf")
    rc, report, _ = compare(tmp_path)
    assert rc == 1
    qa = report["comparison"]["jaxserve_qa"]
    assert not qa["generations_match"] and qa["num_mismatches"] == 1
    assert report["problems"] == ["jaxserve_qa: 1 of 2 generations differ"]


def test_a_non_finite_loglikelihood_fails_and_the_json_stays_valid(tmp_path):
    write_run(tmp_path / "server", lls=shifted(float("-inf")))
    write_run(tmp_path / "hf")
    rc, report, _ = compare(tmp_path)
    assert rc == 1 and report["max_abs_loglikelihood_diff"] is None
    row = next(r for r in report["comparison"]["jaxserve_mc"]["requests"] if r["doc_id"] == 1 and r["request"] == 1)
    assert row["server"] is None and row["abs_diff"] is None


@pytest.mark.parametrize("case", ["missing run", "missing task", "missing request"])
def test_runs_that_do_not_pair_up_fail(tmp_path, case):
    write_run(tmp_path / "hf")
    if case == "missing task":
        write_run(tmp_path / "server", tasks=("jaxserve_mc",))
    elif case == "missing request":
        write_run(tmp_path / "server", lls=LOGLIKELIHOODS[:1])
    rc, report, _ = compare(tmp_path)
    assert rc == 1 and not report["ok"]
    expected = {"missing run": "missing run: server", "missing task": "jaxserve_qa: in one run only",
                "missing request": "jaxserve_mc: the runs hold different requests (2 vs 5)"}[case]
    assert report["problems"] == [expected]
