"""Placement: each connection computes where the anchor block it feeds does, offloaded bases (accelerate's CPU and
disk offload) compose as if they were not, and a placement that cannot work is refused by `compose`."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from accelerate import dispatch_model, init_empty_weights
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from conftest import randomize, tiny
from torch import nn

import calm
from calm.placement import connection_devices, execution_device

CPU, META = torch.device("cpu"), torch.device("meta")


def test_each_connection_goes_where_its_anchor_block_computes():
    # No GPU is needed to name GPUs: the rules only read devices.
    anchor = ["cuda:0", "cuda:0", "cuda:1", torch.device("cuda", 1)]
    augments = [["cuda:1"] * 6, ["cpu", 0]]
    devices = connection_devices([[[0, -1], [2, 1], [5, 3]], [[-1, 2]]], anchor, augments)
    assert devices == [[torch.device("cuda:0"), torch.device("cuda:0"), torch.device("cuda:1")],
                       [torch.device("cuda:1")]]


@pytest.mark.parametrize(("anchor", "augment", "message"), [
    (["cpu", "meta"], ["cpu", "cpu"],
     r"anchor block 1 is on the meta device without an accelerate offload hook: its weights were never loaded"),
    (["disk", "cpu"], ["cpu", "cpu"], r"anchor block 0 has execution device 'disk': disk is where accelerate keeps"),
    ([{"cpu", "cuda:0"}, "cpu"], ["cpu", "cpu"],
     r"anchor block 0 has its weights on 2 devices \(cpu, cuda:0\) and no accelerate hook"),
    (["cpu", "cpu"], ["meta", "cpu"], r"augment 0's block 0 is on the meta device without an accelerate offload hook"),
], ids=["anchor_meta", "anchor_disk", "anchor_split", "augment_meta"])
def test_placements_that_cannot_work_are_refused(anchor, augment, message):
    with pytest.raises(ValueError, match=message):
        connection_devices([[[1, 0], [1, 1]]], anchor, [augment])


def test_augment_blocks_after_the_deepest_tap_never_run_so_are_not_checked():
    assert connection_devices([[[0, 1]]], ["cpu", "cpu"], [["cpu", "meta"]]) == [[CPU]]


def test_skeletons_compose_on_meta_but_a_half_loaded_model_is_refused():
    assert connection_devices([[[0, 1]]], ["meta", "meta"], [["meta", "cpu"]]) == [[META]]
    with pytest.raises(ValueError, match="augment 0's block 0 is on the meta device"):
        connection_devices([[[0, 1]]], ["cpu", "cpu"], [["meta", "meta"]])


def test_execution_device_is_the_accelerate_hooks_else_the_weights():
    assert execution_device(nn.Linear(2, 2)) == CPU
    with init_empty_weights():
        offloaded = nn.Linear(2, 2)
    assert execution_device(offloaded) == META  # never loaded, and nothing says where it would compute
    assert execution_device(nn.Sequential(nn.Linear(2, 2), offloaded)) == {CPU, META}
    add_hook_to_module(offloaded, ModelHook())
    hook = AlignDevicesHook(execution_device="cpu", offload=True, weights_map=nn.Linear(2, 2).state_dict())
    add_hook_to_module(offloaded, hook, append=True)  # with the first: a SequentialHook
    assert offloaded.weight.device == META and execution_device(offloaded) == CPU


def test_compose_refuses_an_anchor_whose_weights_were_never_loaded():
    with init_empty_weights():
        anchor = tf.AutoModelForCausalLM.from_config(tiny("llama", 32, 4, 4).config)
    with pytest.raises(ValueError, match="anchor block 0 is on the meta device without an accelerate offload hook"):
        calm.compose(anchor, tiny("qwen2", 16, 4, 2, seed=1), num_connections=2)


def offloaded_pair(tmp_path):
    """The `pair` models, offloaded by accelerate as `device_map` loading does: two anchor blocks and every augment
    block on disk (their weights on "meta", read back for each call), the rest on the CPU."""
    anchor, augment = tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 6, 2, seed=1)
    anchor.save_pretrained(tmp_path / "anchor")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    anchor = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "anchor", device_map=device_map,
                                                     offload_folder=tmp_path / "anchor_offload")
    dispatch_model(augment, device_map={"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                        "model.rotary_emb": "cpu", "lm_head": "cpu"},
                   offload_dir=tmp_path / "augment_offload")
    assert {p.device for p in anchor.model.layers[1].parameters()} == {META}
    assert {p.device for p in augment.model.layers.parameters()} == {META}
    return anchor, augment


def test_an_offloaded_anchor_and_augment_compute_what_placed_ones_do(tmp_path, pair):
    reference = calm.compose(*pair, connections=[(-1, -1), (2, 1), (5, 2)])
    randomize(reference)
    model = calm.compose(*offloaded_pair(tmp_path), connections=[(-1, -1), (2, 1), (5, 2)])
    assert {p.device for p in model.composition.parameters()} == {CPU}  # where the offloaded blocks compute
    model.composition.load_state_dict(reference.composition.state_dict())
    ids = torch.randint(3, 90, (2, 8))

    for m in (reference, model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6)
               for p, q in zip(reference.composition.parameters(), model.composition.parameters()))
    assert all(p.grad is None for p in [*model.anchor.parameters(), *model.augments.parameters()])

    for m in (reference, model):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **generate), reference.generate(ids, **generate))
