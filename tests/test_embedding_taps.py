"""Connection index -1: the embeddings (the input of block 0), on the augment side, the anchor side or both."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB, randomize, tiny
from test_generate import greedy_without_cache, left_padded

import calm
from calm.blocks import decoder_blocks


def ids(length: int = 10) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def block0_input(model, run) -> torch.Tensor:
    """What block 0 of `model` receives (its hidden_states argument, after every pre-hook) while `run()`
    executes."""
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        box["x"] = args[0] if args else kwargs["hidden_states"]

    handle = decoder_blocks(model)[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return box["x"]


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_to_embedding_connection_matches_a_hand_computed_update(arch):
    """The update is read from the input of augment block 0 and added to the input of anchor block 0."""
    anchor, augment = tiny(arch, 32, 3, 4, seed=0), tiny(arch, 16, 3, 2, seed=1)
    model = calm.compose(anchor, augment, connections=[(-1, -1)])
    randomize(model)
    x = ids()
    anchor_in = block0_input(anchor, lambda: anchor(input_ids=x))
    augment_in = block0_input(augment, lambda: augment(input_ids=x))
    layer = model.composition[0][0]
    with torch.no_grad():
        expected = anchor_in + layer(anchor_in, *layer.keys_values(augment_in), "causal")
    assert torch.allclose(block0_input(anchor, lambda: model(input_ids=x)), expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, anchor(input_ids=x).logits, atol=1e-4)


def test_an_embedding_only_augment_runs_no_block(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, connections=[(-1, 0)])
    calls: list[int] = []
    for i, block in enumerate(decoder_blocks(augment)):
        block.register_forward_hook(lambda *a, i=i: calls.append(i))
    randomize(model)
    model(input_ids=ids())
    assert calls == []


def test_identity_init_causality_and_cached_generation_with_embedding_taps(pair):
    anchor, augment = pair
    model = calm.compose(anchor, augment, connections=[(-1, -1), (2, 1), (5, 3)])
    x = ids(12)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, anchor(input_ids=x).logits)
    randomize(model)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 5) % VOCAB
    with torch.no_grad():
        a, b = model(input_ids=x).logits, model(input_ids=y).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)
    prompt, mask = left_padded(3)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, prompt, mask, 6, "iterative")[0])


@pytest.mark.parametrize("bad", [(-2, 0), (0, -2)])
def test_below_minus_one_is_refused(pair, bad):
    with pytest.raises(ValueError, match=r"expected an integer in \[-1, "):
        calm.compose(*pair, connections=[bad])
