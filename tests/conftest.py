"""Tiny random models of real architectures, built from configs (the hub is never touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

VOCAB = 96
# Tiny models gain nothing from threads, and oversubscribed cores make them crawl.
torch.set_num_threads(1)


def tiny(arch: str, width: int = 32, layers: int = 4, heads: int = 4, seed: int = 0,
         vocab: int = VOCAB, positions: int = 256) -> tf.PreTrainedModel:
    """A tiny random causal LM of architecture `arch`, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * width, max_position_embeddings=positions, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    if arch == "llama":
        config = tf.LlamaConfig(**common, num_key_value_heads=max(1, heads // 2))
    elif arch == "qwen2":
        config = tf.Qwen2Config(**common, num_key_value_heads=max(1, heads // 2))
    elif arch == "mistral":
        config = tf.MistralConfig(**common, num_key_value_heads=max(1, heads // 2), sliding_window=None)
    elif arch == "gemma":
        config = tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=width // heads)
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=width // heads, sliding_window=8)
    elif arch == "phi":
        config = tf.PhiConfig(**common)
    elif arch == "gpt_neox":
        config = tf.GPTNeoXConfig(**common)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=positions,
                               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    else:
        raise ValueError(arch)
    return tf.AutoModelForCausalLM.from_config(config).eval()


ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "mistral", "phi"]


def randomize(model) -> None:
    """Give the composition layers non-trivial weights (identity init makes them invisible)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.composition.parameters():
            p.normal_(0.0, 0.2)


@pytest.fixture
def pair():
    """Anchor (Llama 4×32) and a narrower, deeper augment (Qwen2 6×16)."""
    return tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 6, 2, seed=1)


@pytest.fixture
def kv_research(monkeypatch):
    """The key-value research probes (research/kv_arithmetic/*.py, not part of the package), importable by their
    file names as they import each other when run as scripts."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "research" / "kv_arithmetic"))
