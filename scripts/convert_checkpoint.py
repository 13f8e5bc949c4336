"""Convert any loadable model (preset, .gguf, HF dir) to an orbax dir that `load_model` restores fast.

  python scripts/convert_checkpoint.py --model=smollm2-135m-instruct --output=/tmp/smollm2-orbax
"""

import json
import time
from pathlib import Path


from absl import app, flags

from models import load_model
from models.loading import orbax_io

FLAGS = flags.DEFINE_string("model", "smollm2-135m-instruct", "preset name, .gguf file or HF checkpoint dir")
OUTPUT = flags.DEFINE_string("output", None, "orbax directory to write", required=True)
DTYPE = flags.DEFINE_string("dtype", "float32", "parameter dtype to store")
WEIGHTS = flags.DEFINE_string("weights", "native", "a quantized checkpoint's weights: native (stored packed) or a "
                              "dtype to dequantize them to (docs/quantization.md)")


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    model = load_model(FLAGS.value, dtype=DTYPE.value, weights=WEIGHTS.value)
    source_s = time.perf_counter() - start
    orbax_io.save(Path(OUTPUT.value), model.config, model.model, model.tokenizer)
    start = time.perf_counter()
    load_model(OUTPUT.value, dtype=DTYPE.value)
    restore_s = time.perf_counter() - start
    print(json.dumps({"source": FLAGS.value, "output": OUTPUT.value, "dtype": DTYPE.value,
                      "source_load_s": round(source_s, 3), "orbax_load_s": round(restore_s, 3)}))


if __name__ == "__main__":
    app.run(main)
