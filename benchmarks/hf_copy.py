"""A GGUF's float32 Hugging Face copy, for the systems that load only HF directories (vLLM, lm-eval's
hf backend): made once by scripts/gguf_to_hf.py in a torch venv and reused while the GGUF is the same
(a stamp in the directory records its path, size and mtime, written after the copy is complete)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from absl import logging

REPO = Path(__file__).resolve().parents[1]
STAMP = "jaxserve_source.json"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def default_dir(gguf: Path) -> Path:
    """Where the copy of `gguf` lives unless told otherwise: build/hf/<GGUF stem>-float32."""
    return REPO / "build" / "hf" / f"{gguf.stem}-float32"


def source_stamp(gguf: Path) -> dict:
    """What identifies the GGUF a copy came from."""
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}


def is_current(out: Path, gguf: Path) -> bool:
    """Whether `out` holds a finished copy of this very GGUF (a changed or replaced file is not it)."""
    stamp = out / STAMP
    return stamp.exists() and json.loads(stamp.read_text()) == source_stamp(gguf)


def hf_copy(gguf: Path, out: Path, python: str, log_path: Path) -> Path:
    """`out`, converted from `gguf` by `python` (a venv with torch and transformers) unless it already
    holds it; a failed conversion raises with its log's tail."""
    if is_current(out, gguf):
        return out
    shutil.rmtree(out, ignore_errors=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logging.info("dequantizing %s to %s (float32) ...", gguf, out)
    with open(log_path, "w") as log:
        rc = subprocess.run([python, str(REPO / "scripts" / "gguf_to_hf.py"), f"--gguf={gguf}", f"--output={out}"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV}).returncode
    if rc != 0:
        raise RuntimeError(f"converting {gguf} failed (exit {rc}); {log_path}:\n{log_path.read_text()[-4000:]}")
    (out / STAMP).write_text(json.dumps(source_stamp(gguf)))
    return out
