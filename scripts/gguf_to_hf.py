"""A GGUF dequantized into a float32 Hugging Face directory (weights, config, tokenizer), for the
systems that load only HF checkpoints: vLLM (scripts/benchmark_serving.py --baseline=vllm) and
lm-eval's hf backend (scripts/eval_lm.py).

Runs in a venv with torch and transformers (`make baselines`, `make eval`); imports nothing from this
repo. benchmarks/hf_copy.py runs it once per GGUF and reuses the directory after.

    .venv-baselines/bin/python scripts/gguf_to_hf.py --gguf=model.gguf --output=build/hf/model-float32
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

_GGUF = flags.DEFINE_string("gguf", None, "The GGUF file.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The HF directory to write.", required=True)


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` (float32) and save it with its tokenizer. A GGUF-loaded model is marked
    quantized and will not save_pretrained, so its state dict goes into a plain model of the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(loaded.state_dict(), strict=True)
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str]) -> None:
    del argv
    convert(Path(_GGUF.value), Path(_OUTPUT.value))


if __name__ == "__main__":
    app.run(main)
