"""The trainable composition layer: f_proj (augment width -> anchor width) followed by f_cross."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """One connection: anchor hidden states attend to projected augment hidden states.

    Keys/values are computed once per augment position (`keys_values`) so that generation can cache them;
    `forward` returns the residual update for the anchor, which the caller adds to the anchor stream.
    """

    def __init__(self, augment_width: int, anchor_width: int, num_heads: int, qk_norm: bool = True,
                 init: str = "identity", rope_theta: float | None = None, augment_dropout: float = 0.0,
                 augment_norm: bool = True, value_norm: bool = True) -> None:
        super().__init__()
        if anchor_width % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the anchor's hidden width {anchor_width}"
            )
        self.num_heads = num_heads
        self.head_dim = anchor_width // num_heads
        if rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"rotary cross-attention needs an even head size, got {self.head_dim} "
                             f"(anchor width {anchor_width} / num_heads {num_heads})")
        self.rope_theta = rope_theta
        # f_proj's input at unit RMS whatever the augment's scale: a small model trained with weight decay can
        # keep its states 50-100x smaller than that, and f_proj, initialised for unit inputs, then learns slowly.
        # No weights of its own: a per-dimension gain would fold into f_proj.
        self.augment_norm = nn.RMSNorm(augment_width, elementwise_affine=False) if augment_norm else nn.Identity()
        # Dropout on the augment's states in training, as LoRA drops its input: f_proj must then read a fact
        # from many of the augment's directions at once, which can carry over better to facts the composition
        # data never showed.
        self.augment_dropout = nn.Dropout(augment_dropout)
        self.proj = nn.Linear(augment_width, anchor_width)  # f_proj
        self.q = nn.Linear(anchor_width, anchor_width, bias=False)
        self.k = nn.Linear(anchor_width, anchor_width, bias=False)
        self.v = nn.Linear(anchor_width, anchor_width, bias=False)
        self.o = nn.Linear(anchor_width, anchor_width, bias=False)
        # The residual streams of pretrained models have very different scales; normalising both sides keeps
        # the attention logits sane from the first step (the paper leaves normalisation unspecified). qk_norm:
        # the queries read the anchor's states through `query_norm`, the keys read f_proj's output through
        # `proj_norm`. value_norm: the values read f_proj's output through that same `proj_norm`.
        self.qk_norm, self.value_norm = qk_norm, value_norm
        self.query_norm = nn.RMSNorm(anchor_width) if qk_norm else nn.Identity()
        self.proj_norm = nn.RMSNorm(anchor_width) if qk_norm or value_norm else nn.Identity()
        if init == "identity":
            # Zero output projection: the composed model starts as exactly the anchor.
            nn.init.zeros_(self.o.weight)
        # "random": every projection keeps nn.Linear's default init.

    def _here(self, x: torch.Tensor, dtype: bool = True) -> torch.Tensor:
        """`x` on this layer's device (and, with `dtype`, in its dtype): each connection lives where its anchor block
        computes, which need not be where the augment's states or the anchor's input are. Keys and values keep
        their dtype: this layer made them, in its own dtype or autocast's."""
        weight = self.q.weight
        return x.to(device=weight.device, dtype=weight.dtype if dtype else None)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Rotary position encoding of (B, H, L, head_dim) at `positions` (B or 1, L; default 0..L-1). Queries at
        anchor position t and keys at augment position s then score by their offset t - s, which is what lets a
        query find "the augment's state at this very token" (both models read the same tokens)."""
        if self.rope_theta is None:
            return x
        positions = torch.arange(x.shape[-2], device=x.device)[None] if positions is None else positions.to(x.device)
        half = self.head_dim // 2
        freqs = self.rope_theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        angles = positions[:, None, :, None].float() * freqs
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

    def keys_values(self, augment_states: torch.Tensor, positions: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project augment hidden states (B, S, D_A) at `positions` (B or 1, S) to per-head keys and values
        (B, H, S, head_dim). Keys are stored already rotated, so a cache never needs their positions."""
        x = self.augment_norm(self._here(augment_states))
        x = self.proj(self.augment_dropout(x))
        normed = self.proj_norm(x) if self.qk_norm or self.value_norm else x
        keys = self.k(normed if self.qk_norm else x)
        values = self.v(normed if self.value_norm else x)
        return self._rotate(self._heads(keys), positions), self._heads(values)

    def _query(self, anchor_states: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self._rotate(self._heads(self.q(self.query_norm(self._here(anchor_states)))), positions)

    def attention_probs(self, anchor_states: torch.Tensor, keys: torch.Tensor,
                        mask: torch.Tensor | str | None = "causal", positions: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Attention weights (B, H, T, S) of anchor states over augment positions, for inspection and plots."""
        query = self._query(anchor_states, positions)
        scores = query @ self._here(keys, dtype=False).transpose(-1, -2) / self.head_dim**0.5
        if mask == "causal":
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if torch.is_tensor(mask):
            scores = scores.masked_fill(~self._here(mask, dtype=False), float("-inf"))
        return scores.softmax(-1).nan_to_num(0.0)

    def forward(self, anchor_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | str | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Residual update for anchor states (B, T, D_B) at `positions` (B or 1, T). `mask` is a (B, 1, T, S)
        tensor, True where attention is allowed; "causal" for a plain causal mask over equal lengths; None when
        every key is visible. Inputs on other devices or in other dtypes are brought to the layer's; the update is
        returned on the device and in the dtype of `anchor_states`."""
        query = self._query(anchor_states, positions)
        keys, values = self._here(keys, dtype=False), self._here(values, dtype=False)
        if mask is None or isinstance(mask, str):
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=mask == "causal")
        else:
            # A query with no visible key (left padding) would give NaN; let it see everything, then zero it.
            mask = self._here(mask, dtype=False)
            has_key = mask.any(dim=-1, keepdim=True)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask | ~has_key)
            out = out * has_key
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o(out).to(device=anchor_states.device, dtype=anchor_states.dtype)
