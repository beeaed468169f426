"""Bad files: corrupted weights, broken configs, the wrong base models and untrusted checkpoints. Each is a
clear error naming the file, nothing is half-loaded, and nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from robust_support import char_tokenizer, composed, composition_state, quick, randomize, sum_examples, tiny
from safetensors.torch import load_file, save_file

import calm
from calm.serialization import CONFIG_NAME, WEIGHTS_NAME, save_composition
from calm.train import CheckpointError, train

# ------------------------------------------------------------------------------------------ helpers


def snapshot(*models: torch.nn.Module) -> list:
    """Everything loading may not change on a failure: weights, requires_grad, train/eval modes and hooks (a
    composition installs its own on the bases)."""
    return [([(n, p.detach().clone(), p.requires_grad) for n, p in m.named_parameters()],
             [(mod.training, len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in m.modules()])
            for m in models]


def assert_unchanged(before: list, *models: torch.nn.Module) -> None:
    for (params, modes), model in zip(before, models):
        now = dict(model.named_parameters())
        for name, value, grad in params:
            assert torch.equal(now[name], value) and now[name].requires_grad == grad, name
        assert [(mod.training, len(mod._forward_hooks), len(mod._forward_pre_hooks))
                for mod in model.modules()] == modes


@pytest.fixture
def saved(tmp_path, pair):
    """A saved composition, and its bases in training mode with trainable weights (as a user may hold them),
    so that a load that touched them before failing would show."""
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2, num_heads=2)
    randomize(model)
    model.save_pretrained(tmp_path / "saved")
    for base in (anchor, augment):
        base.train().requires_grad_(True)
    return tmp_path / "saved", anchor, augment


def load(path: Path, anchor, augment):
    return calm.CALMForCausalLM.from_pretrained(path, anchor=anchor, augments=[augment])


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


# -------------------------------------------------------------------------- corrupted model.safetensors


def _flip_data_byte(data: bytes) -> bytes:
    header = 8 + int.from_bytes(data[:8], "little")
    index = header + (len(data) - header) // 2
    return data[:index] + bytes([data[index] ^ 0x40]) + data[index + 1:]


def _header_garbage(data: bytes) -> bytes:
    return data[:8] + b"#" * 40 + data[48:]


CORRUPTIONS = {
    "empty": lambda d: b"",
    "7_bytes": lambda d: d[:7],
    "length_only": lambda d: d[:8],
    "half_header": lambda d: d[: 8 + int.from_bytes(d[:8], "little") // 2],
    "half_data": lambda d: d[: len(d) // 2],
    "last_byte_missing": lambda d: d[:-1],
    "random_bytes": lambda d: random.Random(0).randbytes(len(d)),
    "zeros": lambda d: bytes(len(d)),
    "header_garbage": _header_garbage,
    "huge_header_length": lambda d: (2**62).to_bytes(8, "little") + d[8:],
    "flipped_data_byte": _flip_data_byte,
    "trailing_garbage": lambda d: d + b"\x00garbage",
    "json_instead": lambda d: b'{"weights": [1, 2, 3]}',
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_weights_are_refused_and_nothing_is_touched(saved, kind):
    path, anchor, augment = saved
    weights = path / WEIGHTS_NAME
    weights.write_bytes(CORRUPTIONS[kind](weights.read_bytes()))
    before = snapshot(anchor, augment)
    with pytest.raises(ValueError, match=r"model\.safetensors (is corrupted or truncated|does not match the checksum)"):
        load(path, anchor, augment)
    assert_unchanged(before, anchor, augment)


def test_weights_from_another_save_do_not_pass_as_this_configs(saved, tmp_path, pair):
    """Same shapes, other values: e.g. a copy that mixed two runs, or an interrupted manual copy."""
    path, anchor, augment = saved
    other = calm.compose(*pair, num_connections=2, num_heads=2)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_NAME, path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"does not match the checksum recorded in calm_config\.json"):
        load(path, anchor, augment)


def composition_weights(path: Path) -> dict[str, torch.Tensor]:
    """The saved weights under their names in the composition (the file holds them under the model's)."""
    return {k.removeprefix("composition."): v for k, v in load_file(path / WEIGHTS_NAME).items()}


def rewrite_weights(path: Path, edit) -> None:
    """Replace the weights as a conversion script would: a valid file, and no checksum in the config."""
    weights = composition_weights(path)
    edit(weights)
    save_file({f"composition.{k}": v for k, v in weights.items()}, path / WEIGHTS_NAME)
    edit_config(path, lambda c: c.pop("weights_sha256"))


FIRST = "0.0.proj.weight"  # (32, 16): augment width 16 -> anchor width 32


@pytest.mark.parametrize(("edit", "message"), [
    (lambda w: w.update({FIRST: w[FIRST].to(torch.int64)}), r"0\.0\.proj\.weight has dtype torch\.int64, "
                                                             r"expected a floating-point tensor"),
    (lambda w: w.update({FIRST: w[FIRST] > 0}), r"has dtype torch\.bool, expected a floating-point"),
    (lambda w: w.update({FIRST: w[FIRST].t().contiguous()}), r"0\.0\.proj\.weight has shape \(16, 32\), "
                                                             r"expected \(32, 16\)"),
    (lambda w: w.update({FIRST: w[FIRST][:, :8].contiguous()}), r"has shape \(32, 8\), expected \(32, 16\)"),
    (lambda w: w.pop(FIRST), r"does not fit calm_config\.json: missing \['0\.0\.proj\.weight'\]"),
    (lambda w: w.update({"0.9.proj.weight": torch.zeros(1)}), r"unexpected \['0\.9\.proj\.weight'\]"),
])
def test_wrong_tensors_are_refused_before_any_is_loaded(saved, edit, message):
    path, anchor, augment = saved
    rewrite_weights(path, edit)
    before = snapshot(anchor, augment)
    with pytest.raises(ValueError, match=message):
        load(path, anchor, augment)
    assert_unchanged(before, anchor, augment)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes_are_cast(saved, dtype):
    path, anchor, augment = saved
    original = composition_weights(path)
    rewrite_weights(path, lambda w: w.update({k: v.to(dtype) for k, v in w.items()}))
    model = load(path, anchor, augment)
    for name, value in model.composition.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, original[name].to(dtype).float())


# ------------------------------------------------------------------------------- calm_config.json


def _drop(key):
    return lambda c: c.pop(key)


def _set(**values):
    return lambda c: c.update(values)


def _set_in(key, **values):
    return lambda c: (c[key] if key == "anchor" else c[key][0]).update(values)


BAD_CONFIGS = [
    # (id, edit, message) -- test_serialization.py covers num_heads missing/str, anchor.width str, init, not JSON
    *[(f"missing_{name}", _drop(name), rf"field '{name}' is missing")
      for name in ("connections", "qk_norm", "value_norm", "init", "augment_mode", "anchor", "augments")],
    ("connections_dict", _set(connections={}), r"field 'connections' must be list, got dict"),
    ("connections_str", _set(connections="2:1"), r"field 'connections' must be list, got str"),
    ("qk_norm_int", _set(qk_norm=1), r"field 'qk_norm' must be bool, got int"),
    ("value_norm_int", _set(value_norm=1), r"value_norm=1 is invalid: expected True or False"),
    ("num_heads_bool", _set(num_heads=True), r"field 'num_heads' must be int, got bool"),
    ("num_heads_float", _set(num_heads=2.0), r"field 'num_heads' must be int, got float"),
    ("num_heads_zero", _set(num_heads=0), r"num_heads=0 is invalid: expected a positive integer"),
    ("num_heads_not_dividing", _set(num_heads=3), r"num_heads=3 must divide the anchor's hidden width 32"),
    ("augment_mode_unknown", _set(augment_mode="encoder"), r"augment_mode='encoder' is invalid"),
    ("anchor_list", _set(anchor=[]), r"field 'anchor' must be dict, got list"),
    ("augments_dict", _set(augments={}), r"field 'augments' must be list, got dict"),
    ("augment_not_object", _set(augments=["x"]), r"augments\[0\] must be an object"),
    ("anchor_layers_bool", _set_in("anchor", num_layers=True), r"anchor\.num_layers must be int, got True"),
    ("anchor_width_negative", _set_in("anchor", width=-32), r"anchor\.width=-32 is invalid: expected a positive"),
    ("anchor_vocab_zero", _set_in("anchor", vocab_size=0), r"anchor\.vocab_size=0 is invalid"),
    ("augment_name_int", _set_in("augments", name_or_path=5), r"augments\[0\]\.name_or_path must be str, got 5"),
    ("anchor_vocab_missing", lambda c: c["anchor"].pop("vocab_size"), r"anchor\.vocab_size must be int, got None"),
    ("anchor_layer_out_of_range", _set(connections=[[[2, 1], [5, 9]]]),
     r"connections\[1\] anchor layer 9 is out of range: expected an integer in \[-1, 3\]"),
    ("augment_layer_out_of_range", _set(connections=[[[6, 1]]]),
     r"connections\[0\] augment layer 6 is out of range: expected an integer in \[-1, 5\]"),
    ("negative_layer", _set(connections=[[[-2, 1]]]), r"augment layer -2 is out of range"),
    ("not_increasing", _set(connections=[[[2, 3], [5, 1]]]), r"anchor layers must be strictly increasing"),
    ("layer_not_int", _set(connections=[[["a", 1]]]), r"augment layer 'a' is not an integer"),
    ("pair_of_one", _set(connections=[[[2]]]), r"connections\[0\]=\[2\] is invalid: expected a pair"),
    ("pair_not_list", _set(connections=[[5]]), r"connections\[0\]=5 is invalid: expected a pair"),
    ("no_pairs", _set(connections=[[]]), r"connections=\[\] is invalid: expected a non-empty list"),
    ("more_lists_than_augments", _set(connections=[[[2, 1]], [[3, 2]]]), r"2 connection lists|2 lists but there"),
    ("future_format", _set(format="calm/6"), r"format 'calm/6' was written by a newer version of calm, which this "
                                             r"one cannot read \(it reads up to 'calm/5'\): upgrade calm-compose"),
    ("other_format", _set(format="calm-run/5"), r"format 'calm-run/5' is not supported: expected 'calm/5'"),
    ("option_missing", lambda c: c.pop("augment_norm"), r"field 'augment_norm' is missing"),
    ("dtype_not_float", _set(composition_dtype="int8"), r"composition_dtype='int8' is invalid: expected one of"),
    ("checksum_int", _set(weights_sha256=5), r"field 'weights_sha256' must be str, got int"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fields_name_file_and_field(saved, edit, message):
    path, anchor, augment = saved
    edit_config(path, edit)
    before = snapshot(anchor, augment)
    with pytest.raises(ValueError, match=r"calm_config\.json: .*" + message):
        load(path, anchor, augment)
    assert_unchanged(before, anchor, augment)


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"is not valid JSON"), (b"[1, 2]", r"must hold a JSON object, got list"),
    (b"null", r"must hold a JSON object, got NoneType"), (b'{"num_heads": 4', r"is not valid JSON"),
    (b"\xff\xfe{}", r"is not valid JSON"), (b'{"a": 1} trailing', r"is not valid JSON"),
])
def test_unparseable_configs(saved, content, message):
    path, anchor, augment = saved
    (path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=r"calm_config\.json " + message):
        load(path, anchor, augment)


# ------------------------------------------------------------------------------- the wrong base models


def qwen(layers: int = 6, width: int = 16, vocab: int = 96) -> tf.PreTrainedModel:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                              num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: (tiny("llama", 32, 3, 4), qwen()), r"anchor does not match .*: num_layers is 3 .* num_layers=4"),
    (lambda: (tiny("llama", 16, 4, 4), qwen()), r"anchor does not match .*: width is 16 .* width=32"),
    (lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
                                                 num_attention_heads=4, intermediate_size=64)), qwen()),
     r"anchor does not match .*: vocab_size is 50 .* vocab_size=96"),
    (lambda: (tiny("llama", 32, 4, 4), qwen(layers=5)), r"augments\[0\] does not match .*: num_layers is 5"),
    (lambda: (tiny("llama", 32, 4, 4), qwen(width=32)), r"augments\[0\] does not match .*: width is 32"),
    (lambda: (tiny("llama", 32, 4, 4), [qwen(), qwen()]), r"the composition has 1 augments but 2 were given"),
    (lambda: (tiny("llama", 32, 4, 4), []), r"the composition has 1 augments but 0 were given"),
])
def test_loading_onto_the_wrong_bases_is_refused_and_leaves_them_alone(saved, make, message):
    path = saved[0]
    anchor, augments = make()
    augments = augments if isinstance(augments, list) else [augments]
    for base in (anchor, *augments):
        base.train().requires_grad_(True)
    before = snapshot(anchor, *augments)
    with pytest.raises(ValueError, match=message):
        calm.CALMForCausalLM.from_pretrained(path, anchor=anchor, augments=augments)
    assert_unchanged(before, anchor, *augments)


def test_stray_pickles_in_a_composition_directory_are_never_read(saved, tmp_path):
    path, anchor, augment = saved
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (path / name).write_bytes(pickle.dumps(Payload(marker)))
    load(path, anchor, augment)
    assert not marker.exists()


# --------------------------------------------------------------------------- untrusted checkpoints


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_payload_is_real(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory holding checkpoint-2 of a 2-step run (resumed to 3 steps by the tests)."""
    root = tmp_path_factory.mktemp("trained")
    train(composed(), char_tokenizer(), sum_examples(8), config=quick(root, max_steps=2, save_steps=2))
    return root / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints" / "checkpoint-2"


def resume(tmp_path: Path, model=None):
    return train(model or composed(), char_tokenizer(), sum_examples(8),
                 config=quick(tmp_path, max_steps=3, save_steps=2, resume=True))


@pytest.mark.parametrize(("name", "zip_format"), [
    ("optimizer.pt", True), ("optimizer.pt", False), ("scheduler.pt", True), ("rng_state.pth", True),
    ("rng_state.pth", False), ("extra_state.pt", True),
])
def test_a_pickle_payload_in_a_checkpoint_is_never_executed(run_copy, tmp_path, name, zip_format):
    _, checkpoint = run_copy
    marker = tmp_path / "pwned"
    if zip_format:  # what torch.save writes
        torch.save({"state": Payload(marker)}, checkpoint / name)
    else:  # a legacy plain pickle
        (checkpoint / name).write_bytes(pickle.dumps({"state": Payload(marker)}))
    model = composed()
    before = composition_state(model)
    with pytest.raises(CheckpointError, match=rf"cannot resume from .*checkpoint-2: {name} is not a plain tensor "
                                              r"file, so it is not loaded .*Delete checkpoint-2"):
        resume(tmp_path, model)
    assert not marker.exists(), "the payload ran"
    assert all(torch.equal(v, composition_state(model)[k]) for k, v in before.items()), "half-resumed"


def test_training_args_bin_is_never_read_so_its_payload_is_harmless(run_copy, tmp_path):
    _, checkpoint = run_copy
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), checkpoint / "training_args.bin")
    assert resume(tmp_path).global_step == 3
    assert not marker.exists()


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("trainer_state.json", b"{not json", r"trainer_state\.json cannot be read"),
    ("trainer_state.json", b"[]", r"trainer_state\.json must hold a JSON object"),
    ("data_state.json", b"\x00\x01", r"data_state\.json cannot be read"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", r"model\.safetensors"),
    ("calm_config.json", b"{oops", r"calm_config\.json cannot be read"),
    ("optimizer.pt", b"PK\x03\x04 truncated zip", r"optimizer\.pt is not a plain tensor file"),
])
def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(run_copy, tmp_path, name, damage, message):
    _, checkpoint = run_copy
    (checkpoint / name).write_bytes(damage)
    model = composed()
    before = composition_state(model)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-2: .*" + message):
        resume(tmp_path, model)
    assert all(torch.equal(v, composition_state(model)[k]) for k, v in before.items())


def test_a_checkpoint_of_another_composition_does_not_fit(run_copy, tmp_path):
    """Same data, another composition (one connection instead of two): refused, naming what differs."""
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    model = calm.compose(anchor, augment, num_connections=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit calm_config\.json: "
                                              r"missing \[\], unexpected \['0\.1\."):
        resume(tmp_path, model)


def test_resuming_a_checkpoint_that_passes_the_checks_still_works(run_copy, tmp_path):
    _, checkpoint = run_copy
    assert resume(tmp_path).resumed_from == str(checkpoint)


def test_save_composition_writes_a_checksum_it_verifies(tmp_path, pair):
    model = calm.compose(*pair, num_connections=1)
    save_composition(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    import hashlib

    assert config["weights_sha256"] == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
