"""Tokenizers for the cross-tokenizer tests: a character-level one built here, and two real families (SmolLM2's
byte-level BPE, Gemma-3's SentencePiece BPE with byte fallback) read from the GGUF packages and cached on disk."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest
import transformers as tf
from tokenizers import Tokenizer, decoders, models

CACHE = Path(os.environ.get("CALM_TEST_CACHE", Path.home() / ".cache" / "calm-tests"))
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


@cache
def real_tokenizer(name: str) -> tf.PreTrainedTokenizerBase:
    """A real tokenizer from a packaged GGUF model, converted once and kept under ~/.cache/calm-tests. Skips
    (outside CI) when the package is not installed; in CI its absence fails the test."""
    from calm.packaged import gguf_file

    saved = CACHE / f"{name}-tokenizer"
    if not (saved / "tokenizer.json").is_file():
        try:
            path = gguf_file(name)
        except ModuleNotFoundError as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(e))
        tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(saved)
    return tf.AutoTokenizer.from_pretrained(saved)
