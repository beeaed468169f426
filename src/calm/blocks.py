"""Find the decoder blocks and hidden width of any Hugging Face decoder-only causal LM."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class BaseInfo:
    """What the composition needs to know about one base model."""

    num_layers: int
    width: int
    vocab_size: int
    num_heads: int | None


def _text_config(model: PreTrainedModel):
    return model.config.get_text_config(decoder=True)


# How transformers names the norm a pre-norm block reads its input through, and the norm after the last block.
INPUT_NORM_NAMES = ("input_layernorm", "ln_1", "ln_attn", "attention_norm", "norm1")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, found without knowing its architecture.

    Picks the `nn.ModuleList` whose length equals the configured layer count and whose children share one
    class; among several candidates (rare), the outermost one wins.
    """
    return _named_decoder_blocks(model)[1]


def _named_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    num_layers = getattr(_text_config(model), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if len({type(m) for m in module}) == 1:
            candidates.append((name.count("."), name, module))
    if not candidates:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"{num_layers} identical blocks (config.num_hidden_layers)"
        )
    _, name, blocks = min(candidates, key=lambda c: c[0])
    return name, blocks


def _norm_name(where: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((child for child in names if isinstance(getattr(where, child, None), nn.Module)), None)


def next_input_norm(model: PreTrainedModel, block: int) -> nn.Module:
    """The norm through which the model itself reads the residual stream after `block` (-1: the embeddings): the
    input norm of block `block + 1`, or the final norm after the last block."""
    name, blocks = _named_decoder_blocks(model)
    if block + 1 < len(blocks):
        where, names = blocks[block + 1], INPUT_NORM_NAMES
        what = f"block {block + 1}'s input norm (a child named one of {INPUT_NORM_NAMES})"
    else:
        where, names = model.get_submodule(name.rpartition(".")[0]), FINAL_NORM_NAMES
        what = f"the norm after the last block (a sibling of `{name}` named one of {FINAL_NORM_NAMES})"
    child = _norm_name(where, names)
    if child is not None:
        return getattr(where, child)
    raise ValueError(f"augment_norm='block' needs {type(model).__name__}'s {what}, and it has none: use "
                     "augment_norm=True (a plain RMS norm) for this model")


def base_info(model: PreTrainedModel) -> BaseInfo:
    """Layer count, hidden width, vocabulary size and attention heads of a causal LM."""
    config = _text_config(model)
    width = getattr(config, "hidden_size", None)
    if width is None:
        raise ValueError(f"{type(model).__name__}'s config has no hidden_size")
    return BaseInfo(
        num_layers=len(decoder_blocks(model)),
        width=int(width),
        vocab_size=int(config.vocab_size),
        num_heads=getattr(config, "num_attention_heads", None),
    )


def decoder_prefix(model: PreTrainedModel, depth: int) -> nn.Module:
    """The model's decoder (the module that holds its blocks) cut to its first `depth` blocks and without its
    final norm (its child named one of `FINAL_NORM_NAMES`), so that its first output is the residual stream after
    block `depth - 1` (the embeddings, as block 0 reads them, for `depth=0`). Nothing after that block runs.

    A shallow copy: it shares every submodule and tensor with `model` (it is not registered anywhere, and
    `model` is left as it is); only its list of blocks and its final norm are its own. Every decoder runs its
    blocks as `for layer in self.layers[: config.num_hidden_layers]` or over all of `self.layers`, so a shorter
    list is all it takes, with the rotary embeddings and masks computed as before."""
    name, blocks = _named_decoder_blocks(model)
    parent_name, _, list_name = name.rpartition(".")
    decoder = model.get_submodule(parent_name)
    prefix = copy.copy(decoder)
    prefix._modules = dict(decoder._modules)  # its own children table: the swaps below leave `decoder` alone
    # An accelerate hook on the decoder itself (device_map={"model": ...}) replaced its `forward` with one bound to
    # the decoder, which would run every block: the copy keeps its class's own (its caller places the inputs).
    for attribute in ("forward", "_old_forward", "_hf_hook"):
        prefix.__dict__.pop(attribute, None)
    prefix._modules[list_name] = nn.ModuleList(blocks[:depth])
    norm = _norm_name(decoder, FINAL_NORM_NAMES)
    if norm is not None:
        prefix._modules[norm] = nn.Identity()
    return prefix


def block_reads_its_mode(block: nn.Module) -> bool:
    """Whether a block's own `forward` reads `self.training`, as OPT's and Falcon's do to apply dropout without a
    dropout module; True when its source cannot be read."""
    try:
        return "self.training" in inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return True


def dropout_probabilities(model: PreTrainedModel) -> dict[str, float]:
    """The nonzero dropout probabilities of the model's (text) config, by name."""
    return {name: value for name, value in _text_config(model).to_dict().items()
            if "dropout" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0}
