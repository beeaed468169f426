"""Saving and loading compositions: a JSON config, the composition weights in safetensors, the tokenizers and a
model card; never the base models, which are recorded by where they can be found again (`calm.hub`)."""

from __future__ import annotations

import contextlib
import copy
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
from torch.nn.modules.module import _IncompatibleKeys
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils.hub import convert_file_size_to_int

from .alignment import tokenizer_fingerprint
from .blocks import base_info
from .config import OPTIONS, CALMConfig
from .formats import COMPOSITION, format_tag, read_version, upgrade_options, upgrade_weights
from .hub import DOWNLOAD_KWARGS, composition_directory, load_base, locate, push_directory
from .model_card import CARD_NAME, card_text, may_write_card

# Saving and loading never import the model class: `CALMForCausalLM` imports this module, and passes itself in.
Model = TypeVar("Model", bound=PreTrainedModel)

CONFIG_NAME = "calm_config.json"
HF_CONFIG_NAME = "config.json"  # what AutoConfig reads; calm itself reads calm_config.json
ANCHOR_TOKENIZER_DIR = "tokenizer"
AUGMENT_TOKENIZER_DIR = "augment_tokenizer"
GENERATION_CONFIG_NAME = "generation_config.json"  # the composition's generation defaults, as transformers saves them
WEIGHTS_NAME = "model.safetensors"  # the composition's weights under the model's names, as the Trainer loads them
LEGACY_WEIGHTS_NAME = "calm.safetensors"  # format versions 1-3: names relative to the composition
WEIGHTS_PREFIX = "composition."
_RECORD_FIELDS = {"name_or_path": str, "num_layers": int, "width": int, "vocab_size": int}
_OPTIONAL_RECORD_FIELDS = {"tokenizer_fingerprint": str, "shares_tokenizer": bool, "model_type": str,
                           "local_path": str, "hub_id": str, "revision": str}
_LOCATION_FIELDS = ("local_path", "hub_id", "revision")
_HUB_OPTIONS = ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr", "revision")
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


def save_pretrained(model: PreTrainedModel, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, max_shard_size: int | str | None = None,
                    safe_serialization: bool = True, tags: Sequence[str] = (), **hub_options: Any) -> Any:
    """`CALMForCausalLM.save_pretrained`: check every argument, write the composition (`save_composition`; only
    on the main process) and, with `push_to_hub`, upload what was written. Returns the Hub commit, or None."""
    unknown = sorted(set(hub_options) - set(_HUB_OPTIONS))
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {', '.join(unknown)}: a composition "
                        f"takes is_main_process, state_dict, push_to_hub (with {', '.join(_HUB_OPTIONS)}), "
                        "max_shard_size and safe_serialization=True")
    if safe_serialization is not True:
        raise ValueError(f"safe_serialization={safe_serialization!r}: compositions are saved only as safetensors")
    given = sorted(k for k, v in hub_options.items() if v not in (None, False))
    if given and not push_to_hub:
        raise ValueError(f"{', '.join(given)} only apply when pushing to the Hub: pass push_to_hub=True")
    prefix_len = len(WEIGHTS_PREFIX)
    weights = None if state_dict is None else {
        k[prefix_len:]: v for k, v in state_dict.items() if k.startswith(WEIGHTS_PREFIX)}
    if not is_main_process:  # the Trainer calls every process; one writes
        return None
    directory = Path(save_directory)
    repo_id = hub_options.pop("repo_id", None) or directory.resolve().name
    written = save_composition(model, directory, weights, max_shard_size=max_shard_size, tags=tags,
                               title=repo_id if push_to_hub else directory.resolve().name)
    if not push_to_hub:
        return None
    return push_directory(directory, written, repo_id, private=hub_options.get("private"),
                          token=hub_options.get("token"), commit_message=hub_options.get("commit_message"),
                          commit_description=hub_options.get("commit_description"),
                          create_pr=bool(hub_options.get("create_pr")), revision=hub_options.get("revision"))


def save_composition(model: PreTrainedModel, save_directory: str | os.PathLike, weights: dict | None = None, *,
                     max_shard_size: int | str | None = None, title: str | None = None,
                     tags: Sequence[str] = ()) -> list[str]:
    """Write the composition to `save_directory`: `calm_config.json` (what calm reads: options, connections,
    where each base model is, the weights' checksum), `config.json` (what `AutoConfig` reads),
    `model.safetensors` (only the composition layers, from `weights` when given), the tokenizers and a model
    card (README.md, unless one that calm did not write is there). The files replace the old ones only once all
    are written completely. Returns the names written."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model.composition.state_dict() if weights is None else weights
    state = {WEIGHTS_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()}
    _check_shard_size(state, max_shard_size)
    records = {"anchor": _located(model.config.anchor, model.anchor),
               "augments": [_located(r, m) for r, m in zip(model.config.augments, model.augments)]}
    config = {key: getattr(model.config, key) for key in (*_CONFIG_FIELDS, *OPTIONS)} | records
    config["format"] = format_tag(COMPOSITION)
    if getattr(model.config, "training_data", None):
        config["training_data"] = model.config.training_data
    hf_config = model.config.to_diff_dict() | records | {"architectures": [type(model).__name__]}
    hf_config.pop(_CHECKSUM_FIELD, None)

    def write_weights(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt"})
        config[_CHECKSUM_FIELD] = _sha256(tmp)

    writers = {
        WEIGHTS_NAME: write_weights,
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"),
        HF_CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n"),
    }
    if getattr(model, "generation_config", None) is not None:  # defaults a user set (max_new_tokens, ...) too
        writers[GENERATION_CONFIG_NAME] = lambda tmp: model.generation_config.to_json_file(tmp)
    if may_write_card(directory):
        trainable = sum(t.numel() for t in state.values())
        card_config = copy.copy(model.config)
        card_config.anchor, card_config.augments = records["anchor"], records["augments"]
        writers[CARD_NAME] = lambda tmp: Path(tmp).write_text(
            card_text(card_config, trainable, title or directory.resolve().name, tags))
    _write_atomically(directory, writers)
    (directory / LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)  # an older save's weights, now stale
    tokenizers = _tokenizer_dirs(model.tokenizer, model.augment_tokenizers)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(directory / name)
    return [*writers, *tokenizers]


def _located(record: dict, model: PreTrainedModel) -> dict:
    """A base model's record with where it can be found now (`calm.hub.locate`), replacing what it said before."""
    kept = {k: v for k, v in record.items() if k not in _LOCATION_FIELDS}
    return kept | locate(model, record)


def _check_shard_size(state: Mapping[str, torch.Tensor], max_shard_size: int | str | None) -> None:
    if max_shard_size is None:
        return
    size = sum(t.numel() * t.element_size() for t in state.values())
    if size > convert_file_size_to_int(max_shard_size):
        raise ValueError(f"max_shard_size={max_shard_size!r} is smaller than the composition weights ({size:,d} "
                         "bytes), which are always saved as one file")


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
    for field, kind in ((_CHECKSUM_FIELD, str), ("training_data", dict)):
        if raw.get(field) is not None and not isinstance(raw[field], kind):
            raise ValueError(f"{path}: field {field!r} must be {kind.__name__}, got {type(raw[field]).__name__}")
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
    config.weights_sha256 = raw.get(_CHECKSUM_FIELD)
    if raw.get("training_data"):
        config.training_data = raw["training_data"]
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


Base = PreTrainedModel | str | os.PathLike | None  # a model, where to load one from, or None: where it is recorded


def load_composition(cls: type[Model], path: str | os.PathLike, anchor: Base = None,
                     augments: Base | Sequence[Base] = None, *, tokenizer: Any = None,
                     augment_tokenizers: Sequence[Any] | None = None, config: CALMConfig | None = None,
                     revision: str | None = None, subfolder: str = "", trust_remote_code: bool = False,
                     **base_kwargs: Any) -> Model:
    """Rebuild the composition saved in local directory or Hub repo `path` (at `revision`, in `subfolder`) on
    the given base models, or those its config records, and load its weights. `config`, when given (as
    `AutoModelForCausalLM` passes it, from config.json), must describe the same composition.

    Everything is checked before anything is loaded: a bad file or a wrong base model raises `ValueError` (or
    `FileNotFoundError`) and leaves the given base models exactly as they were."""
    base_kwargs.pop("_from_auto", None)  # AutoModelForCausalLM's own bookkeeping
    base_kwargs.pop("adapter_kwargs", None)
    download = {k: base_kwargs[k] for k in DOWNLOAD_KWARGS if k in base_kwargs}
    directory = composition_directory(path, revision, subfolder, download)
    saved = load_config(directory)
    _check_same_composition(config, saved, directory)
    config = saved
    config.name_or_path = str(path)
    weights = load_weights(directory, expected_sha256=getattr(config, "weights_sha256", None))
    tokenizer, augment_tokenizers = load_tokenizers(directory, config, tokenizer, augment_tokenizers)
    augments = [None] * len(config.augments) if augments is None else augments
    augments = [augments] if isinstance(augments, (PreTrainedModel, str, os.PathLike)) else list(augments)
    if len(augments) != len(config.augments):
        raise ValueError(f"the composition has {len(config.augments)} augments but {len(augments)} were given")
    base_kwargs["trust_remote_code"] = trust_remote_code
    anchor = _base(anchor, config.anchor, "anchor", base_kwargs)
    augments = [_base(given, record, f"augments[{i}]", base_kwargs)
                for i, (given, record) in enumerate(zip(augments, config.augments))]
    check_base(config.anchor, anchor, "anchor")
    for i, (record, model) in enumerate(zip(config.augments, augments)):
        check_base(record, model, f"augments[{i}]")
    with _restore_modes_on_error([anchor, *augments]):  # building the composition freezes the bases
        model = cls(config, anchor, augments, tokenizer, augment_tokenizers)
        try:
            load_checked(model.composition, weights, weights_file(directory) or directory / WEIGHTS_NAME)
        except BaseException:
            model._remove_hooks()  # and takes its hooks off them
            raise
    if (directory / GENERATION_CONFIG_NAME).is_file():  # what was saved replaces the anchor-derived defaults
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def _base(given: Base, record: dict, who: str, base_kwargs: dict) -> PreTrainedModel:
    if isinstance(given, PreTrainedModel):
        return given
    if given is not None and not isinstance(given, (str, os.PathLike)):
        raise TypeError(f"{who} must be a PreTrainedModel, a local directory or a Hub id (or None for the one "
                        f"the composition records), got {type(given).__name__}")
    return load_base(record, who, given, base_kwargs)


def _check_same_composition(given: Any, saved: CALMConfig, directory: Path) -> None:
    """`from_pretrained(config=...)`: only a config of this very composition is accepted (calm_config.json is
    what the composition is rebuilt from)."""
    if given is None:
        return
    if not isinstance(given, CALMConfig):
        raise TypeError(f"config must be a CALMConfig, got {type(given).__name__}")
    for key in ("connections", *OPTIONS):
        if getattr(given, key, None) != getattr(saved, key):
            raise ValueError(f"config.{key}={getattr(given, key, None)!r} differs from {getattr(saved, key)!r} in "
                             f"{directory / CONFIG_NAME}: a composition is rebuilt from its own saved config")


def load_state(model: PreTrainedModel, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> Any:
    """Load a state dict of the composition's weights alone (what `model.safetensors` holds, under the model's
    names) into `model.composition`, checked as `load_checked` does. The frozen bases are never part of it, so
    nothing is reported missing."""
    weights = {k[len(WEIGHTS_PREFIX):]: v for k, v in state_dict.items()}
    load_checked(model.composition, weights, "the state dict", assign=assign)
    return _IncompatibleKeys([], [])


def weights_file(directory: str | os.PathLike) -> Path | None:
    """The composition weights file in `directory` (`model.safetensors`, or an older calm's `calm.safetensors`),
    or None."""
    return next((p for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (p := Path(directory) / name).is_file()), None)


def load_weights(directory: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Composition weights from `model.safetensors` (or `calm.safetensors`, before format version 4; never
    unpickles), under their current names relative to the composition (a file of an older format version is
    upgraded, `calm.formats.upgrade_weights`). With `expected_sha256` (recorded in calm_config.json), a file
    that differs from the one saved with the config is refused."""
    path = weights_file(directory)
    if path is None:
        raise FileNotFoundError(f"{Path(directory) / WEIGHTS_NAME} not found: the composition weights are missing")
    try:
        data = path.read_bytes()
        weights = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupted or truncated: {e}") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path} does not match the checksum recorded in {CONFIG_NAME}: the file is corrupted, "
                         "or it is not the one saved with this config (an interrupted or mixed-up copy?)")
    if path.name == LEGACY_WEIGHTS_NAME:
        return upgrade_weights(weights)
    outside = sorted(k for k in weights if not k.startswith(WEIGHTS_PREFIX))
    if outside:
        raise ValueError(f"{path} holds weights outside the composition ({outside[:5]}): the base models are "
                         "never saved with it")
    return {k[len(WEIGHTS_PREFIX):]: v for k, v in weights.items()}


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


def load_checked(module: nn.Module, weights: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 assign: bool = False) -> None:
    """`module.load_state_dict(weights)` after `check_weights`: a bad file changes nothing (PyTorch itself would
    copy the tensors that fit before reporting the ones that do not)."""
    check_weights(weights, module, path)
    module.load_state_dict(weights, strict=True, assign=assign)


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

