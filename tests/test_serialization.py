"""save_pretrained / from_pretrained: round trip, and a clear error for every bad file or base model."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from conftest import randomize, tiny

import calm
from calm import formats
from calm.config import OPTIONS
from calm.serialization import CONFIG_NAME, HF_CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, _sha256


def to_version_4_layout(path) -> dict:
    """Rewrite a saved composition as calm wrote it before format version 5: calm.safetensors with names
    relative to the composition, no config.json; returns its calm_config.json, to edit further."""
    from safetensors.torch import load_file, save_file

    weights = {k.removeprefix("composition."): v for k, v in load_file(path / WEIGHTS_NAME).items()}
    save_file(weights, path / LEGACY_WEIGHTS_NAME, metadata={"format": "pt"})
    for name in (WEIGHTS_NAME, HF_CONFIG_NAME, "README.md"):
        (path / name).unlink()
    config = json.loads((path / CONFIG_NAME).read_text())
    config |= {"format": "calm/4", "weights_sha256": _sha256(path / LEGACY_WEIGHTS_NAME)}
    (path / CONFIG_NAME).write_text(json.dumps(config))
    return config


@pytest.fixture
def saved(tmp_path, pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2, num_heads=2)
    randomize(model)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_writes_the_configs_the_composition_weights_and_a_card(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME, "README.md",
                                                             "generation_config.json"])
    from safetensors.torch import load_file

    # The model's own names for the composition weights, and nothing else: the bases are never saved.
    assert set(load_file(path / WEIGHTS_NAME)) == {f"composition.{k}" for k in model.composition.state_dict()}
    config = json.loads((path / CONFIG_NAME).read_text())
    assert config["connections"] == [[[2, 1], [5, 3]]] and config["num_heads"] == 2
    assert config["anchor"]["width"] == 32 and config["augments"][0]["num_layers"] == 6
    hf_config = json.loads((path / HF_CONFIG_NAME).read_text())
    assert hf_config["model_type"] == "calm" and hf_config["architectures"] == ["CALMForCausalLM"]
    assert hf_config["connections"] == config["connections"] and "weights_sha256" not in hf_config


def test_a_version_4_directory_loads_and_a_new_save_replaces_its_weights_file(saved):
    model, path = saved
    to_version_4_layout(path)
    loaded = calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    x = torch.randint(3, 90, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    loaded.save_pretrained(path)
    assert (path / WEIGHTS_NAME).is_file() and not (path / LEGACY_WEIGHTS_NAME).exists()


def test_round_trip_gives_bit_identical_logits(saved):
    model, path = saved
    loaded = calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    x = torch.randint(3, 90, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_every_option_survives_the_round_trip(tmp_path, pair):
    chosen = {"num_heads": 2, "qk_norm": False, "value_norm": True, "init": "random", "augment_mode": "prompt",
              "rope_theta": None, "augment_dropout": 0.25, "augment_norm": False, "composition_dtype": "bfloat16"}
    # Every CALMConfig option is in OPTIONS (what saved files, the run record and the CLI carry over), none left out.
    given = set(inspect.signature(calm.CALMConfig).parameters) - {"connections", "anchor", "augments", "kwargs"}
    assert set(OPTIONS) == given == set(chosen)
    calm.compose(*pair, num_connections=1, **chosen).save_pretrained(tmp_path)
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=pair[0], augments=[pair[1]])
    assert {key: getattr(loaded.config, key) for key in OPTIONS} == chosen
    assert {p.dtype for p in loaded.composition.parameters()} == {torch.bfloat16}


def test_a_new_file_records_the_current_format_version(saved):
    _, path = saved
    assert json.loads((path / CONFIG_NAME).read_text())["format"] == f"calm/{formats.VERSION}" == "calm/5"


def test_a_file_from_a_newer_calm_is_refused(saved):
    model, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps(config | {"format": "calm/6"}))
    with pytest.raises(ValueError, match=r"format 'calm/6' was written by a newer version of calm, which this one "
                                         r"cannot read \(it reads up to 'calm/5'\): upgrade calm-compose"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


@pytest.mark.parametrize("old_format", ["calm/1", None])  # None: no format field at all
def test_a_version_1_file_rebuilds_with_the_options_it_was_made_with(saved, old_format):
    """Version 1 predates rope_theta, augment_dropout and augment_norm: a version 1 file without them was made
    without rotary positions, dropout or the norm (today's defaults would build another composition)."""
    model, path = saved
    config = to_version_4_layout(path)
    for option in formats.VERSION_1_OPTIONS:
        del config[option]
    config.pop("format")
    (path / CONFIG_NAME).write_text(json.dumps(config | ({"format": old_format} if old_format else {})))
    loaded = calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    assert (loaded.config.rope_theta, loaded.config.augment_dropout, loaded.config.augment_norm) == (None, 0.0, False)

    # What a version 1 file does record is kept.
    (path / CONFIG_NAME).write_text(json.dumps(config | {"format": "calm/1", "augment_norm": "block"}))
    loaded = calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    assert (loaded.config.rope_theta, loaded.config.augment_norm) == (None, "block")


def test_a_version_3_file_has_float32_composition_layers(saved):
    """Version 3 predates composition_dtype: its composition layers were always float32."""
    model, path = saved
    config = to_version_4_layout(path)
    del config["composition_dtype"]
    (path / CONFIG_NAME).write_text(json.dumps(config | {"format": "calm/3"}))
    loaded = calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    assert loaded.config.composition_dtype == "float32"
    assert {p.dtype for p in loaded.composition.parameters()} == {torch.float32}
    config["format"] = "calm/4"  # files from version 4 on must say it
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'composition_dtype' is missing"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_a_version_2_file_keeps_what_its_qk_norm_and_init_meant(tmp_path, pair, qk_norm):
    """Up to version 2, qk_norm=True also normalised what the values read (through one norm, saved as
    `key_norm`), and init "random" was called "paper". Such a file loads as qk_norm=value_norm=qk_norm,
    init="random", and gives the logits it gave."""
    from safetensors.torch import load_file, save_file

    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2, num_heads=2, qk_norm=qk_norm, value_norm=qk_norm,
                         init="random")
    randomize(model)
    model.save_pretrained(tmp_path)
    config = to_version_4_layout(tmp_path)
    weights = {k.replace(".proj_norm.", ".key_norm."): v
               for k, v in load_file(tmp_path / LEGACY_WEIGHTS_NAME).items()}
    assert any("key_norm" in k for k in weights) is qk_norm
    save_file(weights, tmp_path / LEGACY_WEIGHTS_NAME, metadata={"format": "pt"})
    del config["value_norm"]
    config |= {"format": "calm/2", "init": "paper", "weights_sha256": _sha256(tmp_path / LEGACY_WEIGHTS_NAME)}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))

    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=anchor, augments=[augment])
    assert (loaded.config.qk_norm, loaded.config.value_norm, loaded.config.init) == (qk_norm, qk_norm, "random")
    x = torch.randint(3, 90, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    if qk_norm:  # what version 2 computed, written out: keys and values both read the key_norm'd projection
        layer, states = loaded.composition[0][0], torch.randn(1, 5, 16)
        projected = layer.proj(torch.nn.functional.rms_norm(states, (16,)))
        normed = torch.nn.functional.rms_norm(projected, (32,), weights["0.0.key_norm.weight"])
        keys, values = layer.keys_values(states)
        assert torch.allclose(values, layer.v(normed).view(1, 5, 2, 16).transpose(1, 2), atol=1e-6)
        assert torch.allclose(keys, layer._rotate(layer.k(normed).view(1, 5, 2, 16).transpose(1, 2), None),
                              atol=1e-6)


def test_a_version_2_run_record_and_checkpoint_weights_are_upgraded_too():
    from calm.cli import _from_run_record

    record = {"format": "calm-run/2", "train": {}, "model": {"connections": [[[1, 1]]], "qk_norm": True,
                                                             "init": "paper"}}
    values = _from_run_record(record, "train_config.json")
    assert (values["qk_norm"], values["value_norm"], values["init"]) == (True, True, "random")
    record["format"] = "calm-run/5"  # today's records mean what they say
    record["model"] |= {"qk_norm": True, "value_norm": False, "init": "identity"}
    assert _from_run_record(record, "train_config.json")["value_norm"] is False
    weights = {"0.1.key_norm.weight": 1, "0.1.query_norm.weight": 2, "0.1.proj.weight": 3}
    assert formats.upgrade_weights(weights) == {"0.1.proj_norm.weight": 1, "0.1.query_norm.weight": 2,
                                                "0.1.proj.weight": 3}


def test_loads_bases_from_recorded_paths(tmp_path, pair):
    anchor, augment = pair
    anchor.save_pretrained(tmp_path / "anchor")
    augment.save_pretrained(tmp_path / "augment")
    anchor = type(anchor).from_pretrained(tmp_path / "anchor")
    augment = type(augment).from_pretrained(tmp_path / "augment")
    model = calm.compose(anchor, augment, num_connections=2)
    randomize(model)
    model.save_pretrained(tmp_path / "calm")
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path / "calm")
    x = torch.randint(3, 90, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


@pytest.mark.parametrize("field,make,message", [
    ("num_layers", lambda: tiny("llama", 32, 5, 4), "num_layers is 5"),
    ("width", lambda: tiny("llama", 48, 4, 4), "width is 48"),
])
def test_wrong_anchor_is_refused(saved, field, make, message):
    model, path = saved
    with pytest.raises(ValueError, match=message):
        calm.CALMForCausalLM.from_pretrained(path, anchor=make(), augments=[model.augments[0]])


def test_anchor_of_another_architecture_warns(saved, recwarn):
    model, path = saved
    mistral = tiny("mistral", 32, 4, 4)  # the same shapes as the Llama anchor it was trained on
    calm.CALMForCausalLM.from_pretrained(path, anchor=mistral, augments=[model.augments[0]])
    messages = [str(w.message) for w in recwarn]
    assert any("anchor is a 'mistral' model" in m and "a 'llama' model" in m for m in messages), messages
    assert {w.filename for w in recwarn if "a 'llama' model" in str(w.message)} == {__file__}  # the caller's line
    calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])
    assert not any("model but the composition was trained on" in str(w.message) for w in recwarn[len(messages):])


def test_wrong_augment_vocab_is_refused(saved):
    model, path = saved
    import transformers as tf

    other = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=6,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    with pytest.raises(ValueError, match=r"augments\[0\].*vocab_size is 50"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[other])


def test_missing_weights_file(saved):
    model, path = saved
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


def test_truncated_weights_file(saved):
    model, path = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


def test_weights_that_do_not_fit_the_config(saved):
    model, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    config["connections"] = [[[2, 1]]]
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("num_heads"), "'num_heads' is missing"),
    (lambda c: c.update(num_heads="four"), "'num_heads' must be int"),
    (lambda c: c["anchor"].update(width="32"), "anchor.width must be int"),
    (lambda c: c.update(init="zeros"), "init='zeros'"),
])
def test_bad_config_fields(saved, edit, message):
    model, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


def test_config_that_is_not_json(saved):
    model, path = saved
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        calm.CALMForCausalLM.from_pretrained(path, anchor=model.anchor, augments=[model.augments[0]])


def test_not_a_composition_directory(tmp_path, pair):
    with pytest.raises(FileNotFoundError, match="calm_config.json"):
        calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=pair[0], augments=[pair[1]])


def test_save_uses_a_given_full_state_dict(tmp_path, pair):
    """Under FSDP/DeepSpeed the Trainer passes the gathered weights; those are what gets written."""
    from safetensors.torch import load_file

    model = calm.compose(*pair, num_connections=2)
    full = {f"composition.{k}": torch.full_like(v, 0.5) for k, v in model.composition.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict={**full, "anchor.lm_head.weight": torch.zeros(1)})
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert set(saved) == set(full)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in saved.values())


def test_saved_files_get_the_usual_mode(tmp_path, pair):
    """Files are readable by others as `open()` would make them (0644 under umask 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        calm.compose(*pair, num_connections=1).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, HF_CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_generation_defaults_set_on_the_composition_are_saved_and_loaded(tmp_path, pair):
    model = calm.compose(*pair, num_connections=1)
    model.generation_config.max_new_tokens = 7
    model.generation_config.repetition_penalty = 1.3
    model.save_pretrained(tmp_path)
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=pair[0], augments=pair[1])
    assert (loaded.generation_config.max_new_tokens, loaded.generation_config.repetition_penalty) == (7, 1.3)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    # A save without the file (an older format) keeps the defaults derived from the anchor.
    (tmp_path / "generation_config.json").unlink()
    again = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=pair[0], augments=pair[1])
    assert again.generation_config.max_new_tokens != 7
