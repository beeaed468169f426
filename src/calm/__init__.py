"""calm: compose frozen Hugging Face causal LMs with trainable cross-attention (CALM, Bansal et al. 2024)."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers for a while; their levels are put back after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# transformers imports torchao (the quant extra) whenever it is installed. Without CUDA, torchao's import logs that
# its CUDA kernels do not load, and torch that torchao registers enums the deprecated way: harmless lines that would
# bury the `calm` command's one-line errors.
with _quiet("torchao", "torch.utils._pytree"):
    from .cache import CALMCache
    from .config import PAPER_LAYER, PRESETS, CALMConfig
    from .model import CALMForCausalLM, compose

__all__ = ["PAPER_LAYER", "PRESETS", "CALMCache", "CALMConfig", "CALMForCausalLM", "compose"]
__version__ = "0.1.0"
