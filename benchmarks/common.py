"""Shared pieces of the benchmarks: the model pairs they measure and a robust timer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers as tf

# name -> (anchor layers, anchor width, augment layers, augment width, vocab)
PAIRS = {
    "small": (8, 512, 6, 256, 32000),
    "tiny": (4, 32, 4, 16, 96),
}


def llama(layers: int, width: int, vocab: int, seed: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                            intermediate_size=4 * width, max_position_embeddings=2048, pad_token_id=0,
                            eos_token_id=None, bos_token_id=None)
    return tf.LlamaForCausalLM(config).eval()


def pair(name: str) -> tuple[tf.PreTrainedModel, tf.PreTrainedModel]:
    anchor_layers, anchor_width, augment_layers, augment_width, vocab = PAIRS[name]
    return llama(anchor_layers, anchor_width, vocab, 0), llama(augment_layers, augment_width, vocab, 1)


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds (the median resists noise from other processes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median times of several functions measured in alternation, so a noisy neighbour hurts all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, transformers {tf.__version__}, Python {platform.python_version()}")
