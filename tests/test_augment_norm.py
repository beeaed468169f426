"""RMS normalisation of the augments' states before f_proj: scale-free, weightless, on by default, saved."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny
from test_generate import left_padded

import calm
from calm.cli import _from_run_record
from calm.layers import CrossAttention


def pair():
    return tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 4, 2, seed=1)


def update(layer: CrossAttention, anchor: torch.Tensor, augment: torch.Tensor) -> torch.Tensor:
    return layer(anchor, *layer.keys_values(augment), "causal")


def test_layer_output_does_not_depend_on_the_augments_scale():
    torch.manual_seed(0)
    normed = CrossAttention(16, 32, num_heads=4).eval()
    torch.nn.init.normal_(normed.o.weight)
    plain = CrossAttention(16, 32, num_heads=4, augment_norm=False).eval()
    plain.load_state_dict(normed.state_dict())  # the norm has no weights: the same layer without it
    anchor, augment = torch.randn(2, 6, 32), torch.randn(2, 6, 16)
    for scale in (0.1, 30.0):  # (far smaller states meet the norm's epsilon)
        assert torch.allclose(update(normed, anchor, augment * scale), update(normed, anchor, augment), atol=1e-4)
        assert not torch.allclose(update(plain, anchor, augment * scale), update(plain, anchor, augment), atol=1e-3)


def test_on_by_default_with_no_weights_of_its_own():
    anchor, augment = pair()
    normed = calm.compose(anchor, augment, num_connections=2)
    plain = calm.compose(anchor, augment, num_connections=2, augment_norm=False)
    assert normed.config.augment_norm is True and plain.config.augment_norm is False
    assert normed.composition.state_dict().keys() == plain.composition.state_dict().keys()
    randomize(normed)
    plain.composition.load_state_dict(normed.composition.state_dict())
    ids, mask = left_padded(3)
    with torch.no_grad():
        assert not torch.allclose(normed(input_ids=ids, attention_mask=mask).logits,
                                  plain(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bad_augment_norm_is_refused(value):
    with pytest.raises(ValueError, match=r"augment_norm=.* is invalid: expected True or False"):
        calm.CALMConfig(augment_norm=value)


@pytest.mark.parametrize("setting", [True, False])
def test_save_load_keeps_the_setting(setting, tmp_path):
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_norm=setting)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "calm_config.json").read_text())["augment_norm"] is setting
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.augment_norm is setting
    ids, mask = left_padded(3)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_files_and_run_records_from_before_the_option_rebuild_without_it(tmp_path):
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_norm=False)
    randomize(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "calm_config.json"
    config = json.loads(path.read_text())
    del config["augment_norm"]  # a file written before the option existed, whose composition had no norm
    path.write_text(json.dumps(config))
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.augment_norm is False
    record = {"train": {}, "model": {"connections": [[[1, 1]]], "num_heads": 2}}
    assert _from_run_record(record)["augment_norm"] is False
    record["model"]["augment_norm"] = True
    assert _from_run_record(record)["augment_norm"] is True
    assert "augment_norm" not in _from_run_record({"train": {}})  # no composition recorded: the flags decide
