"""Low-precision and quantized bases: bfloat16/float16 bases without autocast, composition layers in a dtype of
their own, and a torchao int8 weight-only anchor; each trains its composition and generates exactly as the uncached
greedy loop does."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from conftest import randomize, tiny
from test_generate import greedy_without_cache, left_padded
from train_worker import char_tokenizer, sum_examples

import calm
from calm.train import TrainConfig, train


def composed(anchor: tf.PreTrainedModel, base_dtype: torch.dtype, composition_dtype: str) -> calm.CALMForCausalLM:
    augment = tiny("qwen2", 16, 4, 2, seed=1).to(base_dtype)
    model = calm.compose(anchor.to(base_dtype), augment, num_connections=2, composition_dtype=composition_dtype)
    randomize(model)
    return model


def train_steps(model: calm.CALMForCausalLM, steps: int = 6) -> list[float]:
    """AdamW steps on one batch, without autocast: the losses. Every step, each composition weight has a finite
    gradient and no base weight has one."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.composition.parameters())
        assert all(p.grad is None for p in [*model.anchor.parameters(), *model.augments.parameters()])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_cached_generation_is_exact(model: calm.CALMForCausalLM, mode: str, atol: float) -> None:
    ids, mask = left_padded(4)
    steps = 6
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, augment_mode=mode, return_dict_in_generate=True, output_logits=True)
    expected_ids, expected_logits = greedy_without_cache(model, ids, mask, steps, mode)
    assert torch.equal(out.sequences, expected_ids)
    assert torch.allclose(torch.stack(out.logits, 1).float(), expected_logits.float(), atol=atol)


PRECISIONS = [(torch.bfloat16, "float32", torch.float32), (torch.bfloat16, "auto", torch.bfloat16),
              (torch.float16, "float32", torch.float32)]


@pytest.mark.parametrize(("base_dtype", "composition_dtype", "layer_dtype"), PRECISIONS)
def test_low_precision_bases_train_a_composition_without_autocast(base_dtype, composition_dtype, layer_dtype):
    model = composed(tiny("llama", 32, 4, 4, seed=0), base_dtype, composition_dtype)
    assert {p.dtype for p in model.composition.parameters()} == {layer_dtype}
    assert model.config.composition_dtype == str(layer_dtype).removeprefix("torch.")
    losses = train_steps(model)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["iterative", "prompt"])
@pytest.mark.parametrize(("base_dtype", "composition_dtype", "layer_dtype"),
                         [*PRECISIONS, (torch.float16, "auto", torch.float16)])
def test_low_precision_cached_generation_equals_the_uncached_loop(base_dtype, composition_dtype, layer_dtype, mode):
    model = composed(tiny("llama", 32, 4, 4, seed=0), base_dtype, composition_dtype).eval()
    assert {p.dtype for p in model.composition.parameters()} == {layer_dtype}
    assert_cached_generation_is_exact(model, mode, atol=0.01)  # a few bfloat16 steps at |logits| < 1


def test_composition_dtype_is_checked():
    anchor, augment = tiny("llama", 32, 4, 4, seed=0), tiny("qwen2", 16, 4, 2, seed=1)
    assert calm.compose(anchor, augment, composition_dtype=torch.bfloat16).config.composition_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"composition_dtype='int8' is invalid: expected 'auto' or one of"):
        calm.compose(anchor, augment, composition_dtype="int8")
    with pytest.raises(ValueError, match=r"composition_dtype='auto' \(the anchor's dtype, float64\) is invalid"):
        calm.compose(anchor.to(torch.float64), augment, composition_dtype="auto")


def test_training_refuses_float16_composition_weights(tmp_path):
    model = composed(tiny("llama", 32, 2, 4, seed=0), torch.float32, "float16")
    config = TrainConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=1, save_steps=0,
                         progress_bar=False, precision="fp32")
    with pytest.raises(ValueError, match="the trainable weights are float16, which cannot be trained reliably"):
        train(model, char_tokenizer(), sum_examples(8), config=config)


@pytest.fixture
def int8_anchor(tmp_path) -> tf.PreTrainedModel:
    """The tiny Llama anchor, loaded as Hugging Face users load a quantized frozen base: torchao int8 weight-only
    through `TorchAoConfig`, in bfloat16."""
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    from torchao.quantization import Int8WeightOnlyConfig

    tiny("llama", 32, 4, 4, seed=0).save_pretrained(tmp_path / "anchor")
    anchor = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "anchor", dtype=torch.bfloat16, quantization_config=tf.TorchAoConfig(Int8WeightOnlyConfig()))
    weight = anchor.model.layers[0].mlp.up_proj.weight
    assert anchor.is_quantized and "Int8" in type(weight).__name__
    return anchor


@pytest.mark.parametrize("composition_dtype", ["float32", "auto"])
def test_an_int8_quantized_anchor_trains_a_composition_and_generates_exactly(int8_anchor, composition_dtype):
    model = composed(int8_anchor, torch.bfloat16, composition_dtype)
    losses = train_steps(model)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    for mode in ("iterative", "prompt"):
        assert_cached_generation_is_exact(model, mode, atol=0.01)


def test_the_trainer_trains_a_composition_on_an_int8_anchor(int8_anchor, tmp_path):
    model = composed(int8_anchor, torch.bfloat16, "float32")
    before = {k: v.clone() for k, v in model.composition.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, save_steps=0,
                         progress_bar=False, precision="fp32", learning_rate=1e-2)
    result = train(model, char_tokenizer(), sum_examples(8), config=config)
    assert math.isfinite(result.train_loss)
    assert any(not torch.equal(v, model.composition.state_dict()[k]) for k, v in before.items())
