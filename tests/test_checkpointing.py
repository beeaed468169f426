"""Activation (gradient) checkpointing of the anchor's blocks: the same gradients for less memory, with the anchor's
dropout still off."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from conftest import VOCAB, randomize, tiny
from torch import nn
from train_worker import char_tokenizer, sum_examples
from transformers.modeling_layers import GradientCheckpointingLayer

import calm
from calm.blocks import decoder_blocks
from calm.train import TrainConfig, train


def composed(anchor: tf.PreTrainedModel | None = None) -> calm.CALMForCausalLM:
    anchor = anchor or tiny("llama", 32, 4, 4, seed=0)
    model = calm.compose(anchor, tiny("qwen2", 16, 6, 2, seed=1), connections=[(-1, -1), (1, 1), (3, 2)])
    randomize(model)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def gradients(model: calm.CALMForCausalLM, passes: int = 1) -> list[torch.Tensor]:
    """Composition gradients of the summed loss of `passes` forward passes over different batches, one backward."""
    ids, mask = batch()
    loss = sum(model(input_ids=(ids + i) % VOCAB, attention_mask=mask, labels=ids).loss for i in range(passes))
    loss.backward()
    return [p.grad for p in model.composition.parameters()]


def count_calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gpt_neox"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_anchor_blocks_recompute_and_give_the_same_gradients(arch, reentrant):
    plain, checkpointed = composed(tiny(arch, 32, 4, 4, seed=0)), composed(tiny(arch, 32, 4, 4, seed=0))
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    mlps = [count_calls(decoder_blocks(m.anchor)[2].mlp) for m in (plain, checkpointed)]
    expected = gradients(plain.train())
    for got, want in zip(gradients(checkpointed.train()), expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    assert [len(calls) for calls in mlps] == [1, 2]  # the checkpointed block ran again in the backward pass


def test_gradient_checkpointing_enable_and_disable():
    model = composed().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    blocks = decoder_blocks(model.anchor)
    assert all(b.gradient_checkpointing and b.training for b in blocks)
    assert not any(m.training for b in blocks for m in b.modules() if m is not b)  # dropout stays in eval
    assert not any(m.training for augment in model.augments for m in augment.modules())
    model.eval()
    assert not any(b.training for b in blocks)
    model.train()
    model.activation_checkpointing_disable()
    assert not any(b.gradient_checkpointing or b.training for b in blocks)


def test_anchor_dropout_stays_off_under_checkpointing():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, attention_dropout=0.5, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2)
    model = composed(tf.LlamaForCausalLM(config))
    model.activation_checkpointing_enable()
    model.train()
    ids, mask = batch()
    losses = [model(input_ids=ids, attention_mask=mask, labels=ids).loss for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    decoder_blocks(model.anchor)[0].self_attn.train()  # what it would be with the anchor's dropout on
    assert model(input_ids=ids, attention_mask=mask, labels=ids).loss != losses[0]


def test_an_anchor_whose_blocks_apply_dropout_themselves_is_refused():
    def opt(dropout: float) -> tf.PreTrainedModel:
        config = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
                              word_embed_proj_dim=32, dropout=dropout, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        return tf.OPTForCausalLM(config).eval()

    with pytest.raises(ValueError, match=r"OPTDecoderLayer applies dropout itself in training mode \({'dropout': 0.1}"):
        composed(opt(0.1)).activation_checkpointing_enable()
    model = composed(opt(0.0))
    model.activation_checkpointing_enable()
    assert decoder_blocks(model.anchor)[0].gradient_checkpointing


def test_hooks_run_inside_the_checkpoint_see_the_pass_they_belong_to(monkeypatch):
    """transformers 5.20 checkpointed a block's `__call__`, hooks included, so the injection hooks ran again in
    the backward pass, after their pass ended and after later passes: they must see their own pass's keys."""

    def call_with_hooks_checkpointed(self, *args, **kwargs):  # as transformers 5.20 did
        if not (self.gradient_checkpointing and self.training):
            return nn.Module.__call__(self, *args, **kwargs)

        def run(*inputs):
            self.gradient_checkpointing = False  # the installed version's own checkpoint of `forward` stays out
            try:
                return nn.Module.__call__(self, *inputs, **kwargs)
            finally:
                self.gradient_checkpointing = True
        return self._gradient_checkpointing_func(run, *args)

    expected = gradients(composed().train(), passes=2)
    model = composed()
    model.activation_checkpointing_enable()
    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call_with_hooks_checkpointed)
    for got, want in zip(gradients(model.train(), passes=2), expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_trainer_step_with_gradient_checkpointing(tmp_path):
    model = composed()
    before = [p.detach().clone() for p in model.composition.parameters()]
    mlp_calls = count_calls(decoder_blocks(model.anchor)[2].mlp)
    ids, mask = batch()
    rows = [{"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(ids, mask)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 renamed it activation_checkpointing
        args = tf.TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=2,
                                    per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                                    save_strategy="no", use_cpu=True)
    tf.Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(b.gradient_checkpointing for b in decoder_blocks(model.anchor))
    assert len(mlp_calls) == 4  # two steps, each block run twice
    assert all(not torch.equal(p, q) for p, q in zip(model.composition.parameters(), before) if p.requires_grad)


def test_calm_train_keeps_checkpointing_turned_on_beforehand(tmp_path):
    model = composed()
    model.activation_checkpointing_enable()
    mlp_calls = count_calls(decoder_blocks(model.anchor)[2].mlp)
    config = TrainConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, save_steps=0,
                         progress_bar=False, plot=False, exact_match=False)
    result = train(model, char_tokenizer(), sum_examples(8), config=config)
    assert result.global_step == 2 and result.train_loss == result.train_loss  # not NaN
    assert len(mlp_calls) == 4  # two steps, each block run twice
