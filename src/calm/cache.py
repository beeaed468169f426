"""The composite generation cache: one KV cache per base model plus the projected keys/values per connection."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from .alignment import AlignmentState, TokenizerAligner


class CALMCache(Cache):
    """Everything a composed model must remember between decoding steps.

    - `anchor`: the anchor's own `DynamicCache`.
    - `augments[k]`: augment k's `DynamicCache` (only its blocks up to the deepest tap are ever filled).
    - `projected[k][j]`: keys/values of connection j of augment k, projected once per augment position.
    - `alignments[k]`: for an augment with its own tokenizer, each row's alignment state (None otherwise).

    `layers` lists every one of these layers, so the `Cache` methods that generation calls (`reorder_cache` for
    beam search, `batch_select_indices`, `batch_repeat_interleave`, `crop`, `reset`) act on all of them at once.
    """

    def __init__(self, anchor_config: PretrainedConfig, augment_configs: list[PretrainedConfig],
                 connections: list[list], aligners: list[TokenizerAligner | None] | None = None) -> None:
        self.anchor = DynamicCache(config=anchor_config)
        self.augments = [DynamicCache(config=c) for c in augment_configs]
        self.projected = [[DynamicLayer() for _ in conns] for conns in connections]
        self.alignments = [None if a is None else AlignmentState(a) for a in (aligners or [None] * len(connections))]
        # The same layer objects as the sub-caches hold: a Cache method acting on `layers` acts on them.
        augment_layers = [layer for cache in self.augments for layer in cache.layers]
        projected = [layer for conns in self.projected for layer in conns]
        super().__init__(layers=[*self.anchor.layers, *augment_layers, *projected])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the anchor has seen (the composed model's sequence length so far)."""
        return self.anchor.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.anchor.get_mask_sizes(query_length, layer_idx)

    def __len__(self) -> int:
        return len(self.anchor)

    # The alignment states follow every change of the batch's rows that the layers go through.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in self.alignments:
            if state is not None and state.rows:
                state.select(torch.arange(len(state.rows)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if any(state is not None for state in self.alignments):
            raise NotImplementedError("crop (assisted decoding) is not supported with an augment that has its own "
                                      "tokenizer: its tokens cannot be taken back")
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.alignments = [None if s is None else AlignmentState(s.aligner) for s in self.alignments]

    def _select_rows(self, indices: torch.Tensor) -> None:
        for state in self.alignments:
            if state is not None:
                state.select(indices)
