"""Dropout on the augments' states before f_proj: active in training only, saved with the composition."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny
from test_generate import left_padded

import calm
from calm.layers import CrossAttention


def pair():
    return tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 4, 2, seed=1)


def test_layer_drops_augment_states_in_training_only():
    torch.manual_seed(0)
    dropped = CrossAttention(16, 32, num_heads=4, augment_dropout=0.5)
    torch.nn.init.normal_(dropped.o.weight)
    plain = CrossAttention(16, 32, num_heads=4)
    plain.load_state_dict(dropped.state_dict())  # dropout has no weights: the same layer without it
    anchor, augment = torch.randn(2, 6, 32), torch.randn(2, 6, 16)

    def out(layer):
        return layer(anchor, *layer.keys_values(augment), "causal")

    dropped.train()
    first, second = out(dropped), out(dropped)
    assert not torch.allclose(first, second)  # a fresh mask each call
    assert not torch.allclose(first, out(plain))
    dropped.eval()
    assert torch.equal(out(dropped), out(plain))


def test_composition_is_deterministic_in_eval_and_trains_with_dropout():
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_dropout=0.3)
    randomize(model)
    ids, mask = left_padded(3)
    model.train()
    assert not anchor.training and not augment.training  # the frozen bases never drop anything
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.composition.parameters())
    noisy = [model(input_ids=ids, attention_mask=mask).logits for _ in range(2)]
    assert not torch.allclose(*noisy)
    model.eval()
    plain = calm.compose(anchor, augment, num_connections=2)
    plain.composition.load_state_dict(model.composition.state_dict())
    plain.eval()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       plain(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("p", [-0.1, 1, 1.5, True, "0.1", None])
def test_bad_augment_dropout_is_refused(p):
    with pytest.raises(ValueError, match="augment_dropout"):
        calm.CALMConfig(augment_dropout=p)


def test_save_load_keeps_the_setting_and_old_files_load_without_it(tmp_path):
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_dropout=0.25)
    model.save_pretrained(tmp_path)
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.augment_dropout == 0.25
    assert loaded.composition[0][0].augment_dropout.p == 0.25
    path = tmp_path / "calm_config.json"
    config = json.loads(path.read_text())
    del config["augment_dropout"]  # a file written before the option existed
    config["format"] = "calm/1"  # and by a calm of that time: format version 1
    path.write_text(json.dumps(config))
    assert calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment]).config.augment_dropout == 0

