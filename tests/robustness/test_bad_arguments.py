"""Bad arguments: every one is refused with an error naming the argument, the value and what is allowed.

Property-based tests cover connection specs (any spec is either accepted with valid pairs, or refused naming
the argument) and attention masks (padding never changes a real position's logits and never makes NaN).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_support import randomize, tiny

import calm
from calm.cli import UserError, base_dtype
from calm.config import CALMConfig, resolve_connections
from calm.train import TrainConfig

# Anchor: Llama 4 blocks x 32 wide; augment: Qwen2 6 blocks x 16 wide (the parent conftest's `pair`).

# ------------------------------------------------------------------------------------------ compose()

BAD_COMPOSE = [
    # (kwargs, exception, pattern naming argument, value and what is allowed)
    (dict(connections=[(6, 1)]), ValueError, r"connections\[0\] augment layer 6 is out of range: .*\[-1, 5\]"),
    (dict(connections=[(0, 4)]), ValueError, r"connections\[0\] anchor layer 4 is out of range: .*\[-1, 3\]"),
    (dict(connections=[(-2, 0)]), ValueError, r"augment layer -2 is out of range"),
    (dict(connections=[(0, 2), (1, 1)]), ValueError, r"connections\[1\] anchor layer 1 must be greater .* \(2\)"),
    (dict(connections=[(0, 1), (1, 1)]), ValueError, r"anchor layers must be strictly increasing"),
    (dict(connections=[(0.5, 1)]), ValueError, r"augment layer 0\.5 is not an integer: .*\[-1, 5\]"),
    (dict(connections=[(True, 1)]), ValueError, r"augment layer True is not an integer"),
    (dict(connections=[(0, 1, 2)]), ValueError, r"connections\[0\]=\(0, 1, 2\) is invalid: expected a pair"),
    (dict(connections=[(0,)]), ValueError, r"expected a pair"),
    (dict(connections=[[(0, 0)], [(1, 1)]]), ValueError, r"connections has 2 lists but there are 1 augments"),
    (dict(connections="0:1"), ValueError, r"connections='0:1' is invalid"),
    (dict(num_connections=0), ValueError, r"num_connections=0 is invalid: expected an integer in \[1, 4\]"),
    (dict(num_connections=-2), ValueError, r"num_connections=-2 is invalid"),
    (dict(num_connections=5), ValueError, r"num_connections=5 is invalid: .*\[1, 4\]"),
    (dict(num_connections=2.0), ValueError, r"num_connections=2\.0 is invalid: expected an integer"),
    (dict(num_connections=True), ValueError, r"num_connections=True is invalid"),
    (dict(every=0), ValueError, r"every=0 is invalid: expected an integer in \[1, 6\]"),
    (dict(every=-3), ValueError, r"every=-3 is invalid"),
    (dict(every=7), ValueError, r"every=7 is invalid"),
    (dict(every=1), ValueError, r"every=1 taps 6 augment layers but the anchor has only 4"),
    (dict(every=2, connections=[(0, 0)]), ValueError, r"give only one of .*connections, every"),
    (dict(num_heads=3), ValueError, r"num_heads=3 must divide the anchor's hidden width 32"),
    (dict(num_heads=64), ValueError, r"num_heads=64 must divide the anchor's hidden width 32"),
    (dict(num_heads=0), ValueError, r"num_heads=0 is invalid: expected a positive integer"),
    (dict(num_heads=-4), ValueError, r"num_heads=-4 is invalid"),
    (dict(num_heads=2.0), ValueError, r"num_heads=2\.0 is invalid"),
    (dict(init="zeros"), ValueError, r"init='zeros' is invalid: expected one of \('identity', 'random'\)"),
    (dict(augment_mode="encoder"), ValueError, r"augment_mode='encoder' is invalid: .*'iterative', 'prompt'"),
    (dict(augment_mode=None), ValueError, r"augment_mode=None is invalid"),
    (dict(qk_norm="yes"), ValueError, r"qk_norm='yes' is invalid: expected True or False"),
    (dict(value_norm=None), ValueError, r"value_norm=None is invalid: expected True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_COMPOSE,
                         ids=[re.sub(r"\W+", "_", str(k)).strip("_") for k, _, _ in BAD_COMPOSE])
def test_compose_refuses_bad_arguments_naming_them(pair, kwargs, error, message):
    with pytest.raises(error, match=message):
        calm.compose(*pair, **kwargs)


@pytest.mark.parametrize(("augments", "message"), [
    ([], r"augment is an empty list: give at least one augmenting model"),
    (["not a model"], r"augment\[0\] must be a transformers PreTrainedModel, got str"),
    (lambda augment: [augment, None], r"augment\[1\] must be a transformers PreTrainedModel, got NoneType"),
])
def test_compose_refuses_bad_augment_lists(pair, augments, message):
    anchor, augment = pair
    augments = augments(augment) if callable(augments) else augments
    with pytest.raises((ValueError, TypeError), match=message):
        calm.compose(anchor, augments)


def test_compose_with_augment_none_names_the_argument(pair):
    with pytest.raises(ValueError, match="augment"):
        calm.compose(pair[0], None)


def test_compose_refuses_a_non_model_anchor(pair):
    with pytest.raises(TypeError, match="anchor must be a transformers PreTrainedModel, got NoneType"):
        calm.compose(None, pair[1])


@pytest.mark.parametrize("index", [0, 1])
def test_mismatched_vocabularies_name_the_augment_and_both_sizes(pair, index):
    anchor, augment = pair
    other = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=97, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    augments = [augment, other] if index else [other, augment]
    with pytest.raises(ValueError, match=rf"augment\[{index}\] has vocab_size 97 but the anchor has 96"):
        calm.compose(anchor, augments, num_connections=1)


def test_several_augments_need_one_connection_list_each(pair):
    anchor, augment = pair
    with pytest.raises(ValueError, match=r"with 2 augments, connections must be a list of 2 lists"):
        calm.compose(anchor, [augment, augment], connections=[(0, 0), (1, 1)])
    with pytest.raises(ValueError, match=r"connections has 3 lists but there are 2 augments"):
        calm.compose(anchor, [augment, augment], connections=[[(0, 0)], [(1, 1)], [(2, 2)]])
    with pytest.raises(ValueError, match=r"connections\[0\] anchor layer 9 is out of range"):
        calm.compose(anchor, [augment, augment], connections=[[(0, 0)], [(1, 9)]])


@pytest.mark.parametrize("mode", ["encoder", "", "Prompt"])
def test_unknown_augment_mode_at_call_time(pair, mode):
    model = calm.compose(*pair, num_connections=1)
    x = torch.randint(3, 90, (1, 4))
    with pytest.raises(ValueError, match=rf"augment_mode={mode!r} is invalid: expected one of"):
        model(input_ids=x, augment_mode=mode)
    with pytest.raises(ValueError, match=rf"augment_mode={mode!r} is invalid"):
        model.generate(x, augment_mode=mode, max_new_tokens=1)


# ------------------------------------------------------------------------------ dtype and option names


@pytest.mark.parametrize("name", ["fp16", "float64", "int8", "nn", "Float32", ""])
def test_unknown_dtype_names_are_refused(name):
    with pytest.raises(UserError, match=rf"--dtype {name!r} is invalid: expected one of auto, float32, bfloat16"):
        base_dtype(name)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "BF16", "fp64", "", "amp"])
def test_unknown_precision_names_are_refused(name):
    with pytest.raises(ValueError, match=rf"TrainConfig\.precision={name!r} is invalid: expected one of "
                                         r"\('auto', 'fp32', 'bf16', 'fp16'\)"):
        TrainConfig(precision=name)


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("max_steps", -2, ">= -1"), ("gradient_accumulation_steps", 0, "> 0"), ("logging_steps", 0, "> 0"),
    ("max_length", 0, "> 0"), ("max_length", -5, "> 0"), ("per_device_eval_batch_size", -1, ">= 0"),
    ("dataloader_num_workers", -1, ">= 0"), ("warmup_steps", -0.1, ">= 0"), ("max_grad_norm", -1.0, ">= 0"),
    ("save_total_limit", -1, ">= 0"), ("max_new_tokens", -3, ">= 0"), ("seed", -1, ">= 0"),
    ("learning_rate", 0.0, "> 0"), ("learning_rate", math.nan, "> 0"), ("learning_rate", math.inf, "> 0"),
    ("on_nan", "ignore", r"one of \('stop', 'skip'\)"), ("strict_length", "yes", "bool"),
    ("max_steps", 2.5, "int"), ("output_dir", "", "give a run directory"),
])
def test_train_config_counts_and_names(field, value, allowed):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=.* is invalid: (expected )?{allowed}"):
        TrainConfig(**{field: value})


def test_train_config_from_a_file_with_a_wrong_typed_number():
    with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate='fast' is invalid: expected float"):
        TrainConfig.from_dict({"learning_rate": "fast"})


# ------------------------------------------------------------------------------ property: connections

layer_counts = st.integers(1, 12)
pairs = st.lists(st.tuples(st.integers(-2, 13), st.integers(-2, 13)), max_size=5)


@settings(max_examples=150, deadline=None)
@given(layer_counts, layer_counts, st.sampled_from(["connections", "num_connections", "every"]), pairs,
       st.integers(-2, 14))
def test_any_connection_spec_is_valid_or_refused_by_name(augment_layers, anchor_layers, kind, explicit, count):
    value = explicit if kind == "connections" else count
    try:
        resolved = resolve_connections(augment_layers, anchor_layers, **{kind: value})
    except ValueError as e:
        assert kind in str(e), str(e)  # the message names the argument ...
        if kind != "connections":
            assert repr(value) in str(e), str(e)  # ... and the bad value
        return
    assert resolved, "an accepted spec connects something"
    assert all(-1 <= a < augment_layers and -1 <= b < anchor_layers for a, b in resolved)  # -1: embeddings
    assert all(resolved[i][1] < resolved[i + 1][1] for i in range(len(resolved) - 1))
    if kind == "connections":
        assert resolved == explicit
    # A config recording these base models accepts exactly what resolve_connections accepted.
    record = dict(name_or_path="", num_layers=anchor_layers, width=32, vocab_size=96)
    CALMConfig(connections=[resolved], anchor=record, augments=[{**record, "num_layers": augment_layers}])


@settings(max_examples=100, deadline=None)
@given(layer_counts, layer_counts, pairs)
def test_a_config_refuses_connections_its_bases_do_not_have(augment_layers, anchor_layers, explicit):
    record = dict(name_or_path="", num_layers=anchor_layers, width=32, vocab_size=96)
    augment = {**record, "num_layers": augment_layers}
    try:
        expected = resolve_connections(augment_layers, anchor_layers, connections=explicit)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            CALMConfig(connections=[explicit], anchor=record, augments=[augment])
        return
    assert CALMConfig(connections=[explicit], anchor=record, augments=[augment]).connections == \
        [[list(p) for p in expected]]


# ---------------------------------------------------------------------------- property: attention masks


@pytest.fixture(scope="module")
def masked_models():
    """Compositions with non-trivial composition weights over a RoPE anchor (Llama) and an absolute-position
    anchor (GPT-2), each with a Qwen2 augment."""
    models = {}
    for arch in ("llama", "gpt2"):
        model = calm.compose(tiny(arch, 32, 2, 4, seed=0), tiny("qwen2", 16, 3, 2, seed=1), num_connections=2)
        randomize(model)
        models[arch] = model.eval()
    return models


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["llama", "gpt2"]), st.sampled_from(["left", "right"]),
       st.lists(st.integers(0, 9), min_size=1, max_size=4), st.integers(0, 3), st.randoms(use_true_random=False))
def test_padding_never_changes_real_logits_and_never_makes_nan(masked_models, arch, side, lengths, extra, rnd):
    model = masked_models[arch]
    width = max(lengths) + extra
    if width == 0:
        width = 1  # a batch of fully padded rows
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    rows = []
    for i, n in enumerate(lengths):
        tokens = torch.tensor([rnd.randrange(3, 90) for _ in range(n)], dtype=torch.long)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span], mask[i, span] = tokens, 1
        rows.append((tokens, span))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all(), "NaN/inf in a padded batch (fully padded rows included)"
        for i, (tokens, span) in enumerate(rows):
            if len(tokens):
                alone = model(input_ids=tokens[None]).logits[0]
                torch.testing.assert_close(logits[i, span], alone, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=3),
       st.randoms(use_true_random=False))
def test_prompt_mode_with_right_padding_matches_each_example_alone(masked_models, examples, rnd):
    """Training batches in "prompt" mode: right padding and per-example prompt lengths."""
    model = masked_models["llama"]
    width = max(p + c for p, c in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(examples):
        ids[i, : p + c] = torch.tensor([rnd.randrange(3, 90) for _ in range(p + c)])
        mask[i, : p + c] = 1
    prompt_lengths = torch.tensor([p for p, _ in examples])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, augment_mode="prompt",
                       augment_length=prompt_lengths).logits
        assert torch.isfinite(logits).all()
        for i, (p, c) in enumerate(examples):
            alone = model(input_ids=ids[i : i + 1, : p + c], augment_mode="prompt", augment_length=p).logits[0]
            torch.testing.assert_close(logits[i, : p + c], alone, rtol=1e-4, atol=1e-5)
