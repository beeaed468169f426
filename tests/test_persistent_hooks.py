"""The hooks that join the models are installed once, at compose(); each augment runs as its decoder cut after its
deepest tapped block (no exception stops it), so a composed forward compiles as one graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from conftest import ARCHS, VOCAB, randomize, tiny

import calm


def ids(length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def test_a_composed_training_forward_compiles_without_a_graph_break(pair):
    """No graph break also means no host sync: dynamo breaks the graph wherever Python reads a tensor's value."""
    model = calm.compose(*pair, connections=[(-1, 0), (1, 1), (3, 3)]).train()
    randomize(model)
    x = ids(12)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=x, attention_mask=mask, labels=x)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3"])
def test_tapped_states_are_the_augments_own_hidden_states(arch):
    """The cut decoder's output is the deepest tapped block's output, before any final norm; the others come
    from the hooks. Compared with what transformers itself reports (hidden_states[i + 1]: after block i)."""
    augment = tiny(arch, 16, 4, 2, seed=1)
    model = calm.compose(tiny(arch, 32, 3, 4, seed=0), augment, connections=[(-1, 0), (0, 1), (2, 2)],
                         augment_norm=False)
    x = ids()
    states = model.compute_augment_states(x)[0]
    with torch.no_grad():
        hidden = augment(input_ids=x, output_hidden_states=True).hidden_states
    assert sorted(states) == [-1, 0, 2]
    for a, h in states.items():
        assert torch.equal(h, hidden[a + 1]), a


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_an_embedding_only_augment_gives_the_input_of_block_0(arch):
    augment = tiny(arch, 16, 3, 2, seed=1)
    model = calm.compose(tiny("llama", 32, 3, 4, seed=0), augment, connections=[(-1, 1)], augment_norm=False)
    x = ids()
    with torch.no_grad():
        embeddings = augment(input_ids=x, output_hidden_states=True).hidden_states[0]
    assert torch.equal(model.compute_augment_states(x)[0][-1], embeddings)


def test_base_models_used_alone_are_unchanged(pair):
    anchor, augment = pair
    x = ids()
    with torch.no_grad():
        before = anchor(input_ids=x).logits, augment(input_ids=x).logits
    model = calm.compose(anchor, augment, connections=[(-1, -1), (2, 1), (5, 3)])
    randomize(model)
    with torch.no_grad():
        composed = model(input_ids=x).logits
        after = anchor(input_ids=x).logits, augment(input_ids=x).logits
    assert not torch.allclose(composed, before[0], atol=1e-4)  # the hooks act inside the composition...
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # ...and only there
    assert len(calm.blocks.decoder_blocks(augment)) == 6 and augment.model.norm is not None


def test_a_deep_copy_is_joined_by_its_own_hooks(pair):
    model = calm.compose(*pair, num_connections=2)
    randomize(model)
    twin = copy.deepcopy(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        torch.nn.init.zeros_(model.composition[0][0].o.weight)  # the original changes; its copy must not
        torch.nn.init.zeros_(model.composition[0][1].o.weight)
        assert torch.equal(twin(input_ids=x).logits, expected)
        assert torch.equal(model(input_ids=x).logits, model.anchor(input_ids=x).logits)



def test_an_accelerate_hook_on_the_augments_decoder_does_not_run_it_to_the_end():
    """A device_map that places the decoder as one piece hooks the decoder itself, replacing its `forward` with
    one bound to it: the cut copy must still run only its own blocks."""
    augment = tiny("qwen2", 16, 6, 2, seed=1)
    add_hook_to_module(augment.model, AlignDevicesHook(execution_device="cpu"))
    model = calm.compose(tiny("llama", 32, 4, 4, seed=0), augment, connections=[(1, 1), (3, 3)], augment_norm=False)
    calls: list[int] = []
    for i, block in enumerate(calm.blocks.decoder_blocks(augment)):
        block.register_forward_hook(lambda *args, i=i: calls.append(i))
    x = ids()
    states = model.compute_augment_states(x)[0]
    assert calls == [0, 1, 2, 3]
    with torch.no_grad():
        hidden = augment(input_ids=x, output_hidden_states=True).hidden_states
    assert torch.equal(states[3], hidden[4]) and torch.equal(states[1], hidden[2])
