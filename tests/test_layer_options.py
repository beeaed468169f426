"""The cross-attention layer's options, named for what they do: qk_norm (queries and keys) and value_norm (values),
init "identity" or "random" (once called "paper"), and the paper's plain layer as a preset (`calm.PAPER_LAYER`,
`--preset paper`)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from torch import nn
from train_worker import char_tokenizer, make_assets, sum_examples

import calm
from calm.cli import apply_config_file, build_parser, main
from calm.layers import CrossAttention
from calm.train import TrainConfig, train


def randomized(layer: CrossAttention) -> CrossAttention:
    torch.manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer.eval()


def heads(layer: CrossAttention, x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:2], layer.num_heads, layer.head_dim).transpose(1, 2)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("value_norm", [True, False])
def test_qk_norm_and_value_norm_normalise_what_they_name(qk_norm, value_norm):
    layer = randomized(CrossAttention(16, 32, num_heads=4, qk_norm=qk_norm, value_norm=value_norm))
    torch.manual_seed(0)
    states, anchor = torch.randn(2, 5, 16) * 3, torch.randn(2, 5, 32) * 3
    projected = layer.proj(F.rms_norm(states, (16,)))  # augment_norm: unit RMS, no weights
    normed = F.rms_norm(projected, (32,), layer.proj_norm.weight) if qk_norm or value_norm else None
    keys, values = layer.keys_values(states)
    assert torch.allclose(values, heads(layer, layer.v(normed if value_norm else projected)), atol=1e-6)
    positions = torch.arange(5)[None]
    assert torch.allclose(keys, layer._rotate(heads(layer, layer.k(normed if qk_norm else projected)), positions),
                          atol=1e-6)
    query = F.rms_norm(anchor, (32,), layer.query_norm.weight) if qk_norm else anchor
    assert torch.allclose(layer._query(anchor, positions), layer._rotate(heads(layer, layer.q(query)), positions),
                          atol=1e-6)
    norms = {name for name in layer.state_dict() if "norm" in name}
    assert norms == {"query_norm.weight", "proj_norm.weight"} if qk_norm else norms == {"proj_norm.weight"} \
        if value_norm else norms == set()


def test_qk_norm_alone_leaves_the_values_unnormalised():
    """The old qk_norm=True normalised the values too: it is qk_norm=True with value_norm=True (the default)."""
    both = randomized(CrossAttention(16, 32, num_heads=4))
    keys_only = CrossAttention(16, 32, num_heads=4, value_norm=False)
    keys_only.load_state_dict(both.state_dict())
    states = torch.randn(1, 4, 16)
    (k1, v1), (k2, v2) = both.keys_values(states), keys_only.keys_values(states)
    assert torch.equal(k1, k2) and not torch.allclose(v1, v2)


# ---------------------------------------------------------------------------------------------------- init


def test_init_random_keeps_every_default_init_and_identity_starts_as_the_anchor(pair):
    random_ = calm.compose(*pair, num_connections=1, init="random")
    assert random_.config.init == "random" and random_.composition[0][0].o.weight.abs().sum() > 0
    identity = calm.compose(*pair, num_connections=1)
    assert identity.config.init == "identity" and not identity.composition[0][0].o.weight.any()


def test_init_paper_is_a_deprecated_name_of_random(pair):
    torch.manual_seed(3)
    expected = calm.compose(*pair, num_connections=1, init="random").composition.state_dict()
    torch.manual_seed(3)
    with pytest.warns(DeprecationWarning, match="init='paper' is deprecated: it is now called init='random'"):
        model = calm.compose(*pair, num_connections=1, init="paper")
    assert model.config.init == "random"
    got = model.composition.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    with pytest.warns(DeprecationWarning, match="init='paper'"):
        assert calm.CALMConfig(init="paper").init == "random"


# ---------------------------------------------------------------------------------------------- the preset


def test_the_paper_preset_builds_the_plain_layer_and_trains(tmp_path):
    assert calm.PRESETS["paper"] is calm.PAPER_LAYER
    assert calm.PAPER_LAYER == {"rope_theta": None, "qk_norm": False, "value_norm": False, "augment_norm": False,
                                "init": "random", "augment_dropout": 0.0}
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model = calm.compose(anchor, augment, **calm.PAPER_LAYER)
    assert {k: getattr(model.config, k) for k in calm.PAPER_LAYER} == calm.PAPER_LAYER
    for layer in (layer for layers in model.composition for layer in layers):
        assert layer.rope_theta is None
        assert all(isinstance(m, nn.Identity) for m in (layer.query_norm, layer.proj_norm, layer.augment_norm))
        assert layer.augment_dropout.p == 0.0 and layer.o.weight.abs().sum() > 0  # random init: not the anchor
        # f_proj (a linear map with bias), then q, k, v, o: nothing else carries weights.
        assert set(layer.state_dict()) == {"proj.weight", "proj.bias", "q.weight", "k.weight", "v.weight", "o.weight"}
    before = {k: v.clone() for k, v in model.composition.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, save_steps=0,
                         plot=False,
                         progress_bar=False, tensorboard=False, learning_rate=1e-3, warmup_steps=0)
    result = train(model, char_tokenizer(), sum_examples(4), config=config)
    assert result.global_step == 1 and result.train_loss == result.train_loss  # not NaN
    assert all(not torch.equal(before[k], v) for k, v in model.composition.state_dict().items())


def test_preset_flag_sets_the_layer_options_and_given_flags_win(tmp_path):
    base = ["compose", "--anchor", "a", "--augment", "b"]
    args = apply_config_file(build_parser(), [*base, "--preset", "paper"])
    assert {k: getattr(args, k) for k in calm.PAPER_LAYER} == calm.PAPER_LAYER
    args = apply_config_file(build_parser(), [*base, "--preset", "paper", "--qk-norm", "--init", "identity"])
    assert (args.qk_norm, args.init, args.value_norm, args.rope_theta) == (True, "identity", False, None)
    config = tmp_path / "c.yaml"
    config.write_text("preset: paper\naugment_dropout: 0.1\n")
    args = apply_config_file(build_parser(), [*base, "--config", str(config)])
    assert (args.augment_dropout, args.augment_norm, args.qk_norm) == (0.1, False, False)
    args = apply_config_file(build_parser(), [*base])  # no preset: the library's defaults
    assert (args.qk_norm, args.value_norm, args.init, args.rope_theta) == (True, True, "identity", 10000.0)


def test_train_preset_paper_and_the_deprecated_init_flag(tmp_path, capsys):
    assets = make_assets(tmp_path / "assets", num_examples=4)
    out = tmp_path / "run"
    assert main(["train", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--tokenizer", str(assets["tokenizer"]), "--train-data", str(assets["train"]),
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--save-steps", "0",
                 "--no-plot", "--no-progress-bar", "--no-tensorboard", "--num-connections", "1",
                 "--preset", "paper"]) == 0
    saved = json.loads((out / "calm_config.json").read_text())
    assert {k: saved[k] for k in calm.PAPER_LAYER} == calm.PAPER_LAYER

    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--num-connections", "1", "--init", "paper", "--save", str(tmp_path / "old")]) == 0
    assert "--init paper is deprecated: it is now called --init random" in capsys.readouterr().err
    assert json.loads((tmp_path / "old" / "calm_config.json").read_text())["init"] == "random"
