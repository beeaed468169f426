"""Saving and loading compositions: a JSON config plus composition weights in safetensors, nothing else."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from .blocks import base_info
from .config import CALMConfig

if TYPE_CHECKING:
    from .model import CALMForCausalLM

CONFIG_NAME = "calm_config.json"
WEIGHTS_NAME = "calm.safetensors"
_RECORD_FIELDS = {"name_or_path": str, "num_layers": int, "width": int, "vocab_size": int}
_CONFIG_FIELDS = {"connections": list, "num_heads": int, "qk_norm": bool, "init": str, "augment_mode": str,
                  "anchor": dict, "augments": list}


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_composition(model: CALMForCausalLM, save_directory: str | os.PathLike, weights: dict | None = None) -> None:
    """Write `calm_config.json` and `calm.safetensors` (only the composition layers, from `weights` when given)
    to `save_directory`."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model.composition.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    config = {key: getattr(model.config, key) for key in _CONFIG_FIELDS}
    config["format"] = "calm/1"
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def load_config(directory: str | os.PathLike) -> CALMConfig:
    """Read and check `calm_config.json`; raise `ValueError` naming the missing or wrong-typed field."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a saved composition directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    for field, kind in _CONFIG_FIELDS.items():
        if field not in raw:
            raise ValueError(f"{path}: field {field!r} is missing")
        if not isinstance(raw[field], kind) or (kind is int and isinstance(raw[field], bool)):
            raise ValueError(f"{path}: field {field!r} must be {kind.__name__}, got {type(raw[field]).__name__}")
    for who, record in [("anchor", raw["anchor"]), *((f"augments[{i}]", r) for i, r in enumerate(raw["augments"]))]:
        _check_record(path, who, record)
    if len(raw["augments"]) != len(raw["connections"]):
        raise ValueError(f"{path}: {len(raw['augments'])} augments but {len(raw['connections'])} connection lists")
    kwargs = {k: raw[k] for k in _CONFIG_FIELDS}
    return CALMConfig(**kwargs, vocab_size=raw["anchor"]["vocab_size"])


def _check_record(path: Path, who: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {who} must be an object")
    for field, kind in _RECORD_FIELDS.items():
        if not isinstance(record.get(field), kind):
            raise ValueError(f"{path}: {who}.{field} must be {kind.__name__}, got {record.get(field)!r}")


def check_base(config_record: dict, model: PreTrainedModel, who: str) -> None:
    """Raise `ValueError` when a base model differs from the one the composition was trained on."""
    info = base_info(model)
    for field in ("num_layers", "width", "vocab_size"):
        expected, got = config_record[field], getattr(info, field)
        if expected != got:
            raise ValueError(
                f"{who} does not match the saved composition: {field} is {got} but the composition was trained "
                f"on {config_record['name_or_path'] or 'a model'} with {field}={expected}"
            )


def load_composition(cls: type[CALMForCausalLM], directory: str | os.PathLike, anchor: PreTrainedModel | None,
                     augments: list[PreTrainedModel] | None, *, trust_remote_code: bool = False,
                     **base_kwargs: Any) -> CALMForCausalLM:
    """Rebuild a composition from `directory` on the given (or recorded) base models and load its weights."""
    config = load_config(directory)
    weights = load_weights(directory)
    if anchor is None:
        anchor = _load_base(config.anchor, "anchor", trust_remote_code, base_kwargs)
    if augments is None:
        augments = [_load_base(r, f"augments[{i}]", trust_remote_code, base_kwargs)
                    for i, r in enumerate(config.augments)]
    augments = [augments] if isinstance(augments, PreTrainedModel) else list(augments)
    if len(augments) != len(config.augments):
        raise ValueError(f"the composition has {len(config.augments)} augments but {len(augments)} were given")
    check_base(config.anchor, anchor, "anchor")
    for i, (record, model) in enumerate(zip(config.augments, augments)):
        check_base(record, model, f"augments[{i}]")
    model = cls(config, anchor, augments)
    expected = set(model.composition.state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{Path(directory) / WEIGHTS_NAME} does not fit calm_config.json: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    try:
        model.composition.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{Path(directory) / WEIGHTS_NAME} does not fit calm_config.json: {e}") from None
    return model


def load_weights(directory: str | os.PathLike) -> dict:
    """Composition weights from `calm.safetensors` (never unpickles)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the composition weights are missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupted or truncated: {e}") from None


def _load_base(record: dict, who: str, trust_remote_code: bool, base_kwargs: dict) -> PreTrainedModel:
    name = record["name_or_path"]
    if not name:
        raise ValueError(f"the saved composition does not record where its {who} came from: pass it explicitly")
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **base_kwargs)
