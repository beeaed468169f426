"""The composite generation cache: one KV cache per base model plus the projected keys/values per connection."""

from __future__ import annotations

from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer


class CALMCache(Cache):
    """Everything a composed model must remember between decoding steps.

    - `anchor`: the anchor's own `DynamicCache`.
    - `augments[k]`: augment k's `DynamicCache` (only its blocks up to the deepest tap are ever filled).
    - `projected[k][j]`: keys/values of connection j of augment k, projected once per augment position.

    `layers` lists every one of these layers, so the `Cache` methods that generation calls (`reorder_cache` for
    beam search, `batch_select_indices`, `batch_repeat_interleave`, `crop`, `reset`) act on all of them at once.
    """

    def __init__(self, anchor_config: PretrainedConfig, augment_configs: list[PretrainedConfig],
                 connections: list[list]) -> None:
        # Cache.__init__ would assign `layers`, which is derived here; set the attributes it would have set.
        self.layer_class_to_replicate = None
        self.offloading = False
        self.anchor = DynamicCache(config=anchor_config)
        self.augments = [DynamicCache(config=c) for c in augment_configs]
        self.projected = [[DynamicLayer() for _ in conns] for conns in connections]

    @property
    def layers(self) -> list:
        augment_layers = [layer for cache in self.augments for layer in cache.layers]
        projected = [layer for conns in self.projected for layer in conns]
        return [*self.anchor.layers, *augment_layers, *projected]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the anchor has seen (the composed model's sequence length so far)."""
        return self.anchor.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.anchor.get_mask_sizes(query_length, layer_idx)

    def __len__(self) -> int:
        return len(self.anchor)
