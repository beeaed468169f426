"""calm: compose frozen Hugging Face causal LMs with trainable cross-attention (CALM, Bansal et al. 2024)."""

from .cache import CALMCache
from .config import PAPER_LAYER, PRESETS, CALMConfig
from .model import CALMForCausalLM, compose

__all__ = ["PAPER_LAYER", "PRESETS", "CALMCache", "CALMConfig", "CALMForCausalLM", "compose"]
__version__ = "0.1.0"

