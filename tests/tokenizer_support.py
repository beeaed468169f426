"""Tokenizers for the cross-tokenizer tests: a character-level one built here, and two real families (SmolLM2's
byte-level BPE, Gemma-3's SentencePiece BPE with byte fallback) read from the GGUF packages and cached on disk."""

from __future__ import annotations

import os
from functools import cache

import pytest
import transformers as tf
from tokenizers import Tokenizer, decoders, models

REAL = ("smollm2-135m-instruct", "gemma-3-270m")


@cache
def char_tokenizer() -> tf.PreTrainedTokenizerFast:
    """One token per ASCII or common accented character, and a byte token for anything else."""
    specials = ["<pad>", "</s>", "<s>"]
    chars = [chr(c) for c in range(32, 127)] + list("\n\téèàüöñç")
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                      bos_token="<s>")


def packaged_or_skip(name: str) -> dict[str, str]:
    """`from_pretrained` arguments of packaged GGUF model `name`. Skips (outside CI) when its package is not
    installed; in CI its absence fails the test."""
    from calm.packaged import from_pretrained_kwargs

    try:
        return from_pretrained_kwargs(name)
    except ModuleNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@cache
def real_tokenizer(name: str) -> tf.PreTrainedTokenizerBase:
    """A real tokenizer from a packaged GGUF model (converted once by `calm.packaged`, kept in its cache)."""
    from calm.packaged import load_tokenizer

    packaged_or_skip(name)
    return load_tokenizer(name)


def real_model(name: str) -> tf.PreTrainedModel:
    """A real packaged model in float32 (dequantised once by `calm.packaged`, kept in its cache)."""
    from calm.packaged import load_model

    packaged_or_skip(name)
    return load_model(name)
