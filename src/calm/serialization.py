"""Saving and loading compositions: a JSON config plus composition weights in safetensors, nothing else."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .alignment import tokenizer_fingerprint
from .blocks import base_info
from .config import OPTIONS, CALMConfig
from .formats import COMPOSITION, format_tag, read_version, upgrade_options, upgrade_weights

# Saving and loading never import the model class: `CALMForCausalLM` imports this module, and passes itself in.
Model = TypeVar("Model", bound=PreTrainedModel)

CONFIG_NAME = "calm_config.json"
ANCHOR_TOKENIZER_DIR = "tokenizer"
AUGMENT_TOKENIZER_DIR = "augment_tokenizer"
WEIGHTS_NAME = "calm.safetensors"
_RECORD_FIELDS = {"name_or_path": str, "num_layers": int, "width": int, "vocab_size": int}
_OPTIONAL_RECORD_FIELDS = {"tokenizer_fingerprint": str, "shares_tokenizer": bool}
_CONFIG_FIELDS = {"connections": list, "num_heads": int, "qk_norm": bool, "init": str, "augment_mode": str,
                  "anchor": dict, "augments": list}
_CHECKSUM_FIELD = "weights_sha256"  # sha256 of calm.safetensors: catches corruption and a config/weights mix-up


def _write_atomically(directory: Path, writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write every file to a temporary file in `directory` first, then rename them all into place.

    A failed write (disk full, a kill) leaves the files that were there before untouched and no temporary
    file behind (a kill can leave a hidden `.NAME.*` temporary). Only the renames, which cannot run out of
    space, happen after the first file is replaced."""
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, temps[name] = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
            os.close(fd)
            write(temps[name])
            os.chmod(temps[name], _new_file_mode())  # mkstemp's 0600 would keep the file from everyone else
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)


def _new_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_composition(model: PreTrainedModel, save_directory: str | os.PathLike, weights: dict | None = None) -> None:
    """Write `calm_config.json` and `calm.safetensors` (only the composition layers, from `weights` when given)
    to `save_directory`. The config records the weights file's checksum; both files replace the old ones only
    once both are written completely."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model.composition.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    config = {key: getattr(model.config, key) for key in (*_CONFIG_FIELDS, *OPTIONS)}
    config["format"] = format_tag(COMPOSITION)

    def write_weights(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt"})
        config[_CHECKSUM_FIELD] = _sha256(tmp)

    _write_atomically(directory, {
        WEIGHTS_NAME: write_weights,
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"),
    })
    for name, tokenizer in _tokenizer_dirs(model.tokenizer, model.augment_tokenizers).items():
        tokenizer.save_pretrained(directory / name)


def _tokenizer_dirs(tokenizer: Any, augment_tokenizers: Sequence[Any]) -> dict[str, Any]:
    """Where each known tokenizer is saved beside the composition: `tokenizer/` (the anchor's) and
    `augment_tokenizer_K/` (augment K's, when it has one of its own)."""
    dirs = {} if tokenizer is None else {ANCHOR_TOKENIZER_DIR: tokenizer}
    dirs |= {f"{AUGMENT_TOKENIZER_DIR}_{k}": t for k, t in enumerate(augment_tokenizers) if t is not None}
    return dirs


def load_tokenizers(directory: str | os.PathLike, config: CALMConfig, tokenizer: Any = None,
                    augment_tokenizers: Sequence[Any] | None = None) -> tuple[Any, list[Any]]:
    """The tokenizers of a saved composition: those given (checked against the fingerprints it recorded) or
    those saved beside it. A tokenizer that differs from the one the composition was trained with is refused."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    augment_tokenizers = list(augment_tokenizers) if augment_tokenizers is not None else [None] * len(config.augments)
    if len(augment_tokenizers) != len(config.augments):
        raise ValueError(f"got {len(augment_tokenizers)} augment tokenizers for {len(config.augments)} augments")
    records = [("tokenizer", ANCHOR_TOKENIZER_DIR, config.anchor, tokenizer)]
    records += [(f"augment_tokenizers[{k}]", f"{AUGMENT_TOKENIZER_DIR}_{k}", r, augment_tokenizers[k])
                for k, r in enumerate(config.augments)]
    loaded = []
    for who, name, record, given in records:
        if given is None and (directory / name).is_dir():
            given = AutoTokenizer.from_pretrained(directory / name)
        expected = record.get("tokenizer_fingerprint")
        if given is not None and expected and tokenizer_fingerprint(given, who) != expected:
            raise ValueError(f"{who} is not the tokenizer this composition was trained with (its fingerprint "
                             f"differs from the one recorded in {CONFIG_NAME}): pass the right one, or none to "
                             f"use the one saved in {directory / name}")
        loaded.append(given)
    return loaded[0], loaded[1:]


def load_config(directory: str | os.PathLike) -> CALMConfig:
    """Read `calm_config.json`, upgrade it to the current format version (`calm.formats`), and check it; raise
    `ValueError` naming a missing or wrong-typed field, or a format this calm cannot read."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a saved composition directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    raw = upgrade_options(raw, read_version(raw.get("format"), COMPOSITION, str(path)))
    checksum = raw.get(_CHECKSUM_FIELD)
    if checksum is not None and not isinstance(checksum, str):
        raise ValueError(f"{path}: field {_CHECKSUM_FIELD!r} must be str, got {type(checksum).__name__}")
    for field in dict.fromkeys((*_CONFIG_FIELDS, *OPTIONS)):
        if field not in raw:
            raise ValueError(f"{path}: field {field!r} is missing")
        kind = _CONFIG_FIELDS.get(field, object)  # CALMConfig checks the other options' values
        if not isinstance(raw[field], kind) or (kind is int and isinstance(raw[field], bool)):
            raise ValueError(f"{path}: field {field!r} must be {kind.__name__}, got {type(raw[field]).__name__}")
    for who, record in [("anchor", raw["anchor"]), *((f"augments[{i}]", r) for i, r in enumerate(raw["augments"]))]:
        _check_record(path, who, record)
    if len(raw["augments"]) != len(raw["connections"]):
        raise ValueError(f"{path}: {len(raw['augments'])} augments but {len(raw['connections'])} connection lists")
    kwargs = {k: raw[k] for k in (*_CONFIG_FIELDS, *OPTIONS)}
    try:
        config = CALMConfig(**kwargs, vocab_size=raw["anchor"]["vocab_size"])
    except ValueError as e:  # options and connections, checked against the recorded base models
        raise ValueError(f"{path}: {e}") from None
    config.weights_sha256 = checksum
    return config


def _check_record(path: Path, who: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {who} must be an object")
    for field, kind in _OPTIONAL_RECORD_FIELDS.items():
        if field in record and not isinstance(record[field], kind):
            raise ValueError(f"{path}: {who}.{field} must be {kind.__name__}, got {record[field]!r}")
    for field, kind in _RECORD_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {who}.{field} must be {kind.__name__}, got {value!r}")
        if kind is int and value < 1:
            raise ValueError(f"{path}: {who}.{field}={value} is invalid: expected a positive integer")


def check_base(config_record: dict, model: PreTrainedModel, who: str) -> None:
    """Raise `ValueError` when a base model's shapes differ from the one the composition was trained on; warn
    when only its architecture does (a checkpoint converted to an equivalent architecture is fine)."""
    info = base_info(model)
    trained_on = config_record["name_or_path"] or "a model"
    for field in ("num_layers", "width", "vocab_size"):
        expected, got = config_record[field], getattr(info, field)
        if expected != got:
            raise ValueError(
                f"{who} does not match the saved composition: {field} is {got} but the composition was trained "
                f"on {trained_on} with {field}={expected}"
            )
    expected_type = config_record.get("model_type")  # absent from files of older versions
    if expected_type and expected_type != model.config.model_type:
        warnings.warn(f"{who} is a {model.config.model_type!r} model but the composition was trained on "
                      f"{trained_on}, a {expected_type!r} model: its weights only make sense on the same base model",
                      stacklevel=4)  # the line that called CALMForCausalLM.from_pretrained


def load_composition(cls: type[Model], directory: str | os.PathLike, anchor: PreTrainedModel | None,
                     augments: list[PreTrainedModel] | None, *, tokenizer: Any = None,
                     augment_tokenizers: Sequence[Any] | None = None, trust_remote_code: bool = False,
                     **base_kwargs: Any) -> Model:
    """Rebuild a composition from `directory` on the given (or recorded) base models and load its weights.

    Everything is checked before anything is loaded: a bad file or a wrong base model raises `ValueError` (or
    `FileNotFoundError`) and leaves the given base models exactly as they were."""
    config = load_config(directory)
    weights = load_weights(directory, expected_sha256=getattr(config, "weights_sha256", None))
    tokenizer, augment_tokenizers = load_tokenizers(directory, config, tokenizer, augment_tokenizers)
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
    with _restore_modes_on_error([anchor, *augments]):  # building the composition freezes the bases
        model = cls(config, anchor, augments, tokenizer, augment_tokenizers)
        try:
            load_checked(model.composition, weights, Path(directory) / WEIGHTS_NAME)
        except BaseException:
            model._remove_hooks()  # and takes its hooks off them
            raise
    return model


def load_weights(directory: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Composition weights from `calm.safetensors` (never unpickles), under their current names (a file of an
    older format version is upgraded, `calm.formats.upgrade_weights`). With `expected_sha256` (recorded in
    calm_config.json), a file that differs from the one saved with the config is refused."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the composition weights are missing")
    try:
        data = path.read_bytes()
        weights = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupted or truncated: {e}") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path} does not match the checksum recorded in {CONFIG_NAME}: the file is corrupted, "
                         "or it is not the one saved with this config (an interrupted or mixed-up copy?)")
    return upgrade_weights(weights)


def check_weights(weights: Mapping[str, torch.Tensor], module: nn.Module, path: str | os.PathLike) -> None:
    """Raise `ValueError` unless `weights` has exactly `module`'s keys, with the same shapes and floating-point
    dtypes (another float dtype is cast on load; integer or boolean tensors are refused)."""
    expected = module.state_dict()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"{path} does not fit {CONFIG_NAME}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path} does not fit {CONFIG_NAME}: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
        if tensor.dtype.is_floating_point != expected[name].dtype.is_floating_point:
            raise ValueError(f"{path}: {name} has dtype {tensor.dtype}, expected a floating-point tensor "
                             f"({expected[name].dtype})")


def load_checked(module: nn.Module, weights: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`module.load_state_dict(weights)` after `check_weights`: a bad file changes nothing (PyTorch itself would
    copy the tensors that fit before reporting the ones that do not)."""
    check_weights(weights, module, path)
    module.load_state_dict(weights, strict=True)


@contextlib.contextmanager
def _restore_modes_on_error(models: Sequence[nn.Module]) -> Iterator[None]:
    """On an exception, put back each parameter's `requires_grad` and each module's train/eval mode."""
    grads = [(p, p.requires_grad) for m in models for p in m.parameters()]
    modes = [(module, module.training) for m in models for module in m.modules()]
    try:
        yield
    except BaseException:
        for p, flag in grads:
            p.requires_grad_(flag)
        for module, flag in modes:
            module.training = flag
        raise


def _load_base(record: dict, who: str, trust_remote_code: bool, base_kwargs: dict) -> PreTrainedModel:
    name = record["name_or_path"]
    if not name:
        raise ValueError(f"the saved composition does not record where its {who} came from: pass it explicitly")
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **base_kwargs)
