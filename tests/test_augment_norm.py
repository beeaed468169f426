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


def assert_same_weights_other_output(one, other) -> None:
    """Two compositions with the same weight names differ in output once given the same random weights."""
    assert one.composition.state_dict().keys() == other.composition.state_dict().keys()
    randomize(one)
    other.composition.load_state_dict(one.composition.state_dict())
    ids, mask = left_padded(3)
    with torch.no_grad():
        assert not torch.allclose(one(input_ids=ids, attention_mask=mask).logits,
                                  other(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


def test_on_by_default_with_no_weights_of_its_own():
    anchor, augment = pair()
    normed = calm.compose(anchor, augment, num_connections=2)
    plain = calm.compose(anchor, augment, num_connections=2, augment_norm=False)
    assert normed.config.augment_norm is True and plain.config.augment_norm is False
    assert_same_weights_other_output(normed, plain)


@pytest.mark.parametrize("value", [1, 0, "yes", "Block", None])
def test_bad_augment_norm_is_refused(value):
    with pytest.raises(ValueError, match=r"augment_norm=.* is invalid: expected True \(unit RMS\), False"):
        calm.CALMConfig(augment_norm=value)


@pytest.mark.parametrize("setting", [True, False, "block"])
def test_save_load_keeps_the_setting(setting, tmp_path):
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_norm=setting)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "calm_config.json").read_text())["augment_norm"] == setting
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.augment_norm == setting
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
    config["format"] = "calm/1"  # and by a calm of that time: format version 1
    path.write_text(json.dumps(config))
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert loaded.config.augment_norm is False
    record = {"train": {}, "model": {"connections": [[[1, 1]]], "num_heads": 2}}  # and no format version
    assert _from_run_record(record, "train_config.json")["augment_norm"] is False
    record["model"]["augment_norm"] = True
    assert _from_run_record(record, "train_config.json")["augment_norm"] is True
    no_composition = _from_run_record({"train": {}}, "train_config.json")
    assert "augment_norm" not in no_composition  # no composition recorded: the flags decide


@pytest.mark.parametrize("arch, norm", [("llama", "input_layernorm"), ("gemma3", "input_layernorm"),
                                        ("gpt2", "ln_1"), ("gpt_neox", "input_layernorm")])
def test_block_mode_reads_each_tap_through_the_augments_next_input_norm(arch, norm):
    augment = tiny(arch, 16, 4, 2, seed=1)
    with torch.no_grad():  # learned gains, so that a plain RMS norm would differ
        for module in augment.modules():
            if getattr(module, "weight", None) is not None and "Norm" in type(module).__name__:
                module.weight.normal_(1.0, 0.5)
    model = calm.compose(tiny("llama", 32, 4, 4, seed=0), augment, connections=[(-1, 0), (1, 2), (3, 3)],
                         augment_norm="block")
    ids = torch.randint(3, 90, (2, 7))
    states = model.compute_augment_states(ids)[0]
    with torch.no_grad():
        hidden = augment(ids, output_hidden_states=True).hidden_states  # [i + 1]: after block i, except the last
        blocks = calm.blocks.decoder_blocks(augment)
        assert torch.allclose(states[-1], getattr(blocks[0], norm)(hidden[0]), atol=1e-6)
        assert torch.allclose(states[1], getattr(blocks[2], norm)(hidden[2]), atol=1e-6)
        final = calm.blocks.next_input_norm(augment, 3)
        assert final is not getattr(blocks[3], norm) and final(states[3]).shape == states[3].shape
        assert torch.allclose(states[3], hidden[4], atol=1e-5)  # transformers' last hidden state is after it


def test_block_mode_adds_no_weights_and_changes_the_output():
    anchor, augment = pair()
    with torch.no_grad():
        for layer in augment.model.layers:
            layer.input_layernorm.weight.normal_(1.0, 0.5)
    block = calm.compose(anchor, augment, num_connections=2, augment_norm="block")
    rms = calm.compose(anchor, augment, num_connections=2)
    assert block.trainable_parameters() == rms.trainable_parameters()
    assert_same_weights_other_output(block, rms)


def test_block_mode_generates_with_the_cache_as_without():
    anchor, augment = pair()
    model = calm.compose(anchor, augment, num_connections=2, augment_norm="block")
    randomize(model)
    ids, mask = left_padded(3)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_block_mode_names_a_model_without_the_norm():
    augment = tiny("llama", 16, 4, 2, seed=1)
    del augment.model.layers[2].input_layernorm
    with pytest.raises(ValueError, match=r"augment_norm='block' needs LlamaForCausalLM's block 2's input norm"):
        calm.compose(tiny("llama", 32, 4, 4, seed=0), augment, connections=[(1, 1)], augment_norm="block")
