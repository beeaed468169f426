"""The cross-attention layer's options, named for what they do: qk_norm (queries and keys) and value_norm (values),
and init "identity" or "random" (once called "paper")."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from train_worker import make_assets

import calm
from calm.cli import main
from calm.layers import CrossAttention


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


# ------------------------------------------------------------------------------------------------- the CLI


def test_the_deprecated_init_flag(tmp_path, capsys):
    assets = make_assets(tmp_path / "assets", num_examples=4)
    assert main(["compose", "--anchor", str(assets["anchor"]), "--augment", str(assets["augment"]),
                 "--num-connections", "1", "--init", "paper", "--save", str(tmp_path / "old")]) == 0
    assert "--init paper is deprecated: it is now called --init random" in capsys.readouterr().err
    assert json.loads((tmp_path / "old" / "calm_config.json").read_text())["init"] == "random"
