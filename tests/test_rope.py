"""Rotary position encoding inside the cross-attention: scores depend on the offset t - s only."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny
from test_generate import greedy_without_cache, left_padded

import calm
from calm.layers import CrossAttention


def layer(rope_theta: float | None = 10000.0) -> CrossAttention:
    torch.manual_seed(0)
    module = CrossAttention(16, 32, num_heads=4, rope_theta=rope_theta)
    torch.nn.init.normal_(module.o.weight)
    return module


def test_scores_depend_only_on_the_offset_between_positions():
    attention = layer()
    anchor, augment = torch.randn(1, 6, 32), torch.randn(1, 6, 16)
    positions = torch.arange(6)[None]
    out = attention(anchor, *attention.keys_values(augment, positions), "causal", positions)
    shifted = positions + 37  # both sides move together: every offset t - s is unchanged
    assert torch.allclose(out, attention(anchor, *attention.keys_values(augment, shifted), "causal", shifted),
                          atol=1e-5)
    # Moving only the keys changes the offsets, hence the output.
    moved = attention(anchor, *attention.keys_values(augment, positions + 3), "causal", positions)
    assert not torch.allclose(out, moved, atol=1e-3)


def test_without_rope_positions_are_ignored():
    attention = layer(rope_theta=None)
    anchor, augment = torch.randn(1, 5, 32), torch.randn(1, 5, 16)
    positions = torch.arange(5)[None]
    out = attention(anchor, *attention.keys_values(augment, positions), "causal", positions)
    assert torch.equal(out, attention(anchor, *attention.keys_values(augment, positions + 3), "causal",
                                      positions))


def test_rope_lets_a_query_pick_out_its_own_position_where_content_cannot():
    """Identical augment states at every position: without positions no query can prefer one of them."""
    attention = layer()
    with torch.no_grad():
        attention.q.weight.copy_(torch.eye(32) * 8)
        attention.k.weight.copy_(torch.eye(32) * 8)
    augment = torch.ones(1, 6, 16)
    anchor = attention.proj_norm(attention.proj(augment))  # queries aligned with the keys
    keys, _ = attention.keys_values(augment, torch.arange(6)[None])
    probs = attention.attention_probs(anchor, keys, positions=torch.arange(6)[None])
    assert torch.equal(probs[0].mean(0).argmax(-1), torch.arange(6))  # each query peaks on its own position
    flat = layer(rope_theta=None)
    flat.load_state_dict(attention.state_dict())
    keys, _ = flat.keys_values(augment)
    uniform = flat.attention_probs(anchor, keys)[0, 0, -1]
    assert torch.allclose(uniform, torch.full((6,), 1 / 6), atol=1e-6)


def test_odd_head_size_is_refused():
    with pytest.raises(ValueError, match="even head size"):
        CrossAttention(16, 30, num_heads=2, rope_theta=10000.0)
    CrossAttention(16, 30, num_heads=2, rope_theta=None)  # no rotation, no constraint


@pytest.mark.parametrize("theta", [0, 1, -5.0, True, "big", [1]])
def test_bad_rope_theta_is_refused(theta):
    with pytest.raises(ValueError, match="rope_theta"):
        calm.CALMConfig(rope_theta=theta)


@pytest.mark.parametrize("theta", [None, 500.0])
def test_cached_generation_and_save_load_keep_the_setting(theta, tmp_path):
    anchor, augment = tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 4, 2, seed=1)
    model = calm.compose(anchor, augment, num_connections=2, rope_theta=theta)
    randomize(model)
    model.eval()
    ids, mask = left_padded(3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 6, "iterative")[0])
    model.save_pretrained(tmp_path)
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.rope_theta == theta
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)
