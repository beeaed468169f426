"""Connection specs and options: the three ways to name connections, and a clear error for each bad one."""

from __future__ import annotations

import pytest
from conftest import tiny
from hypothesis import given
from hypothesis import strategies as st

import calm
from calm.config import evenly_spaced, resolve_connections


def test_num_connections_spreads_evenly_over_both_models():
    assert resolve_connections(6, 12, num_connections=3) == [(1, 3), (3, 7), (5, 11)]


def test_every_k_taps_every_kth_augment_layer():
    assert resolve_connections(12, 24, every=4) == [(3, 7), (7, 15), (11, 23)]


def test_default_is_the_papers_every_fourth_layer():
    assert resolve_connections(8, 16) == resolve_connections(8, 16, every=4)
    assert resolve_connections(3, 5) == resolve_connections(3, 5, num_connections=3)


def test_explicit_connections_pass_through():
    assert resolve_connections(4, 4, connections=[(0, 1), [3, 3]]) == [(0, 1), (3, 3)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(connections=[(4, 1)]), r"augment layer 4 is out of range: expected an integer in \[-1, 3\]"),
    (dict(connections=[(0, -2)]), r"anchor layer -2 is out of range: expected an integer in \[-1, 5\]"),
    (dict(connections=[(0, 2), (1, 2)]), "must be greater than the previous one"),
    (dict(connections=[(0, 3), (1, 1)]), "strictly increasing"),
    (dict(connections=[(0, 1, 2)]), "expected a pair"),
    (dict(connections=[]), "non-empty list"),
    (dict(num_connections=0), r"num_connections=0 is invalid: expected an integer in \[1, 4\]"),
    (dict(num_connections=5), r"num_connections=5 is invalid"),
    (dict(every=-1), r"every=-1 is invalid"),
    (dict(num_connections=2, every=2), "only one of"),
])
def test_bad_connections_name_the_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_connections(4, 6, **kwargs)


@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64))
def test_evenly_spaced_connections_are_valid(augment_layers, anchor_layers, n):
    if n > min(augment_layers, anchor_layers):
        with pytest.raises(ValueError, match="num_connections"):
            resolve_connections(augment_layers, anchor_layers, num_connections=n)
        return
    pairs = resolve_connections(augment_layers, anchor_layers, num_connections=n)
    assert len(pairs) == n
    assert all(0 <= a < augment_layers and 0 <= b < anchor_layers for a, b in pairs)
    assert all(pairs[i][0] < pairs[i + 1][0] and pairs[i][1] < pairs[i + 1][1] for i in range(n - 1))
    assert pairs[-1] == (augment_layers - 1, anchor_layers - 1)


@given(st.lists(st.tuples(st.integers(-3, 10), st.integers(-3, 10)), max_size=6))
def test_random_explicit_connections_are_accepted_only_when_valid(pairs):
    valid = (bool(pairs) and all(-1 <= a < 8 and -1 <= b < 8 for a, b in pairs)
             and all(pairs[i][1] < pairs[i + 1][1] for i in range(len(pairs) - 1)))
    if valid:
        assert resolve_connections(8, 8, connections=pairs) == pairs
    else:
        with pytest.raises(ValueError):
            resolve_connections(8, 8, connections=pairs)


def test_evenly_spaced_ends_on_last_block():
    assert evenly_spaced(10, 1) == [9]


def test_compose_argument_errors(pair):
    anchor, augment = pair
    with pytest.raises(ValueError, match="empty list"):
        calm.compose(anchor, [])
    with pytest.raises(ValueError, match="num_heads=3 must divide the anchor's hidden width 32"):
        calm.compose(anchor, augment, num_heads=3)
    with pytest.raises(ValueError, match="num_heads=0"):
        calm.compose(anchor, augment, num_heads=0)
    with pytest.raises(ValueError, match="init='zero'"):
        calm.compose(anchor, augment, init="zero")
    with pytest.raises(ValueError, match="augment_mode='encoder'"):
        calm.compose(anchor, augment, augment_mode="encoder")
    with pytest.raises(TypeError, match="augment\\[0\\] must be a transformers PreTrainedModel"):
        calm.compose(anchor, ["not a model"])
    with pytest.raises(ValueError, match="with 2 augments"):
        calm.compose(anchor, [augment, augment], connections=[(0, 1)])


def test_mismatched_vocabularies_are_refused(pair):
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="vocab_size 50 but the anchor has 96: the models do not share a tokenizer; "
                                         "pass the anchor.s tokenizer= and the augment.s augment_tokenizer="):
        calm.compose(pair[0], other)


def test_default_heads_follow_the_anchor():
    model = calm.compose(tiny("llama", 32, 4, 8), tiny("llama", 16, 4, 2))
    assert model.config.num_heads == 8
