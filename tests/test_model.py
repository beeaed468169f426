"""The composed model: identity at init, causality, padding, freezing, truncation, architectures, loss."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB, randomize, tiny

import calm
from calm.blocks import decoder_blocks


def ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def test_identity_at_init_is_exact(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, anchor(input_ids=x).logits)


def test_paper_init_changes_the_output(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2, init="random")
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, anchor(input_ids=x).logits)


def test_causal_future_tokens_do_not_leak(pair):
    model = calm.compose(*pair, num_connections=3)
    randomize(model)
    x = ids(1, 12)
    for t in (3, 7, 11):
        y = x.clone()
        y[0, t] = (y[0, t] + 5) % VOCAB
        with torch.no_grad():
            a, b = model(input_ids=x).logits, model(input_ids=y).logits
        assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
        assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)


def test_augment_influences_anchor_through_composition(pair):
    """Changing the augment's weights changes composed logits: the cross-attention really carries signal."""
    model = calm.compose(*pair, num_connections=2)
    randomize(model)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        for p in model.augments[0].parameters():
            p.add_(0.1)
        assert not torch.allclose(before, model(input_ids=x).logits, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(pair, side):
    model = calm.compose(*pair, num_connections=2)
    randomize(model)
    lengths = [9, 5, 7]
    seqs = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        batch[i, cols], mask[i, cols] = s, 1
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None]).logits[0]
            real = padded[i][mask[i].bool()]
            assert torch.allclose(real, alone, atol=1e-5), f"example {i} differs"


def test_bases_frozen_and_composition_trained(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2)
    model.train()
    assert not anchor.training and not augment.training and model.composition.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("composition.") for n in trainable)
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    comp_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = ids()
    for _ in range(2):  # identity init: the first step moves only the zero output projection
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"
        else:
            assert not torch.equal(p, comp_before[n]), f"composition weight {n} did not change"


def test_gradients_reach_every_composition_layer(pair):
    model = calm.compose(*pair, num_connections=3, init="random")
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.composition.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.augments.parameters())
    assert all(p.grad is None for p in model.anchor.parameters())


def test_augment_runs_only_up_to_its_deepest_tap(pair):
    anchor, augment = pair  # augment has 6 blocks
    model = calm.compose(anchor, augment, connections=[(1, 1), (3, 3)])
    calls: list[str] = []
    blocks = decoder_blocks(augment)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *a, i=i: calls.append(f"block{i}"))
    augment.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    augment.model.norm.register_forward_hook(lambda *a: calls.append("norm"))
    model(input_ids=ids())
    assert calls == ["block0", "block1", "block2", "block3"]


def test_loss_matches_transformers(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, num_connections=2)
    x = ids()
    labels = x.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, labels=labels).loss, anchor(input_ids=x, labels=labels).loss)
        randomize(model)
        logits = model(input_ids=x).logits
        manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100)
        assert torch.allclose(model(input_ids=x, labels=labels).loss, manual, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_as_anchor_and_augment(arch):
    anchor = tiny(arch, 32, 4, 4, seed=0)
    augment = tiny(arch, 16, 3, 2, seed=1)
    model = calm.compose(anchor, augment, num_connections=2)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, anchor(input_ids=x).logits)
    randomize(model)
    out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.composition.parameters())


@pytest.mark.parametrize("anchor_arch,augment_arch", [("gpt2", "llama"), ("llama", "gpt_neox"), ("phi", "gemma")])
def test_mixed_architectures_widths_and_depths(anchor_arch, augment_arch):
    anchor = tiny(anchor_arch, 48, 5, 4, seed=0)
    augment = tiny(augment_arch, 24, 8, 2, seed=1)
    model = calm.compose(anchor, augment, every=4)
    assert model.config.connections == [[[3, 1], [7, 4]]]
    randomize(model)
    assert model(input_ids=ids()).logits.shape == (2, 9, VOCAB)


def test_several_augments_each_with_connections():
    anchor = tiny("llama", 32, 4, 4, seed=0)
    aug1, aug2 = tiny("qwen2", 16, 4, 2, seed=1), tiny("gpt2", 24, 2, 2, seed=2)
    model = calm.compose(anchor, [aug1, aug2], connections=[[(1, 1), (3, 3)], [(0, 1), (1, 2)]])
    assert len(model.composition) == 2 and len(model.composition[1]) == 2
    randomize(model)
    x = ids()
    with torch.no_grad():
        both = model(input_ids=x).logits
        torch.nn.init.zeros_(model.composition[1][0].o.weight)
        torch.nn.init.zeros_(model.composition[1][1].o.weight)
        first_only = model(input_ids=x).logits
    assert not torch.allclose(both, first_only, atol=1e-5)  # the second augment contributes (summed at block 1)


def test_bf16_bases_with_fp32_composition(pair):
    anchor, augment = (m.to(torch.bfloat16) for m in pair)
    model = calm.compose(anchor, augment, num_connections=2)
    assert all(p.dtype == torch.float32 for p in model.composition.parameters())
    randomize(model)
    x = ids()
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.composition.parameters())


def test_print_trainable_parameters(pair, capsys):
    model = calm.compose(*pair, num_connections=2)
    model.print_trainable_parameters()
    trainable, total = model.trainable_parameters()
    # The paper's count: n·(D_A·D_B + 4·D_B²) plus the f_proj bias and the two RMSNorm scales.
    assert trainable == 2 * (16 * 32 + 32 + 4 * 32 * 32 + 2 * 32)
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


def test_precomputed_augment_states_give_the_same_loss(pair):
    model = calm.compose(*pair, num_connections=2)
    randomize(model)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    states = model.compute_augment_states(x, mask)
    assert sorted(states[0]) == [2, 5]
    with torch.no_grad():
        direct = model(input_ids=x, attention_mask=mask, labels=x).loss
        cached = model(input_ids=x, attention_mask=mask, labels=x, augment_states=states).loss
    assert torch.equal(direct, cached)


@pytest.mark.parametrize("padded", [False, True])
def test_precomputed_augment_states_with_an_int_prompt_length(pair, padded):
    """Prompt mode with an int `augment_length`: states over the whole input (or over the prompt alone) give the
    forward without them (the states were not cut to the prompt, and the forward crashed)."""
    model = calm.compose(*pair, num_connections=2, augment_mode="prompt")
    randomize(model)
    x = ids()
    mask = torch.ones_like(x)
    if padded:
        mask[0, :2] = 0
    with torch.no_grad():
        direct = model(input_ids=x, attention_mask=mask, augment_length=5).logits
        whole = model(input_ids=x, attention_mask=mask, augment_length=5,
                      augment_states=model.compute_augment_states(x, mask)).logits
        prompt = model(input_ids=x, attention_mask=mask, augment_length=5,
                       augment_states=model.compute_augment_states(x[:, :5], mask[:, :5])).logits
    assert torch.allclose(direct, whole, atol=1e-6) and torch.allclose(direct, prompt, atol=1e-6)
    with pytest.raises(ValueError, match=r"augment_states\[0\] covers \[4\] positions"):
        model(input_ids=x, augment_length=5, augment_states=model.compute_augment_states(x[:, :4]))


def test_attention_probs_match_the_layer_output(pair):
    """The inspection helper computes the same attention as the layer itself."""
    model = calm.compose(*pair, num_connections=1)
    randomize(model)
    layer = model.composition[0][0]
    torch.manual_seed(0)
    anchor_states, augment_states = torch.randn(1, 6, 32), torch.randn(1, 6, 16)
    keys, values = layer.keys_values(augment_states)
    probs = layer.attention_probs(anchor_states, keys)
    assert torch.allclose(probs.sum(-1), torch.ones(1, layer.num_heads, 6))
    assert torch.all(probs.triu(1) == 0)  # causal: nothing after the query position
    mixed = (probs @ values).transpose(1, 2).reshape(1, 6, -1)
    assert torch.allclose(layer.o(mixed), layer(anchor_states, keys, values, "causal"), atol=1e-5)
