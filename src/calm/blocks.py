"""Find the decoder blocks and hidden width of any Hugging Face decoder-only causal LM."""

from __future__ import annotations

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


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, found without knowing its architecture.

    Picks the `nn.ModuleList` whose length equals the configured layer count and whose children share one
    class; among several candidates (rare), the outermost one wins.
    """
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
    return min(candidates, key=lambda c: c[0])[2]


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
