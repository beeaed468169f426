"""The `PreTrainedModel` surface of a composition: embeddings, `inputs_embeds`, its own generation config, the
cache built like any transformers cache, and `pipeline("text-generation")`."""

from __future__ import annotations

import logging

import pytest
import tokenizers
import torch
import transformers as tf
from conftest import VOCAB, randomize
from transformers.cache_utils import Cache

import calm
from calm.cache import CALMCache


@pytest.fixture
def model(pair):
    composed = calm.compose(*pair, connections=[[1, 1], [3, 3]])
    randomize(composed)
    return composed


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w1")
    return tokenizer


def test_input_embeddings_are_the_anchors(model, pair):
    anchor, _ = pair
    assert model.get_input_embeddings() is anchor.get_input_embeddings()
    assert model.get_output_embeddings() is anchor.get_output_embeddings()
    replacement = torch.nn.Embedding(VOCAB, anchor.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert anchor.get_input_embeddings() is replacement


def test_enable_input_require_grads_reaches_the_anchor_embeddings(model):
    ids = torch.randint(3, VOCAB, (2, 6))
    assert not model.get_input_embeddings()(ids).requires_grad  # frozen anchor
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad
    model(input_ids=ids, labels=ids).loss.backward()  # still trains the composition
    assert all(p.grad is not None for p in model.composition.parameters() if p.requires_grad)


def test_inputs_embeds_replace_the_anchor_embeddings(model):
    ids = torch.randint(3, VOCAB, (2, 7))
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(input_ids=ids, inputs_embeds=embeds).logits, model(input_ids=ids).logits)
    # Different embeddings for the anchor change the output: they are really used.
    assert not torch.allclose(model(input_ids=ids, inputs_embeds=embeds * 2).logits, model(input_ids=ids).logits)
    generated = model.generate(input_ids=ids, inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[:, -5:], expected[:, -5:])


@pytest.mark.parametrize("given", ["embeds only", "nothing", "other shape"])
def test_inputs_embeds_need_the_token_ids(model, given):
    ids = torch.randint(3, VOCAB, (2, 7))
    embeds = model.get_input_embeddings()(ids)
    kwargs = {"embeds only": {"inputs_embeds": embeds}, "nothing": {},
              "other shape": {"input_ids": ids[:, :5], "inputs_embeds": embeds}}[given]
    with pytest.raises(ValueError, match="input_ids"):
        model(**kwargs)


def test_generation_config_is_the_compositions_own(model, pair):
    anchor, _ = pair
    assert model.generation_config is not anchor.generation_config
    model.generation_config.max_new_tokens = 3
    assert anchor.generation_config.max_new_tokens != 3
    assert model.generation_config.eos_token_id == anchor.config.eos_token_id


def test_generation_config_fills_missing_ids_from_the_composition(pair):
    anchor, augment = pair
    anchor.generation_config.pad_token_id = None
    model = calm.compose(anchor, augment, connections=[[1, 1]])
    assert model.generation_config.pad_token_id == anchor.config.pad_token_id == 0
    assert anchor.generation_config.pad_token_id is None


def test_cache_is_built_through_cache_init(model):
    cache = model.new_cache()
    assert isinstance(cache, Cache) and isinstance(cache, CALMCache)
    sub_layers = [*cache.anchor.layers, *(layer for c in cache.augments for layer in c.layers),
                  *(layer for conns in cache.projected for layer in conns)]
    assert len(cache.layers) == len(sub_layers)
    assert all(a is b for a, b in zip(cache.layers, sub_layers))
    assert cache.layer_class_to_replicate is None and not cache.offloading
    assert not hasattr(type(model), "_supports_sdpa") or "_supports_sdpa" not in vars(type(model))


def test_pipeline_text_generation_knows_the_composition(model, caplog):
    tokenizer = word_tokenizer()
    with caplog.at_level(logging.WARNING):
        generator = tf.pipeline("text-generation", model=model, tokenizer=tokenizer)
        out = generator("w5 w6 w7", max_new_tokens=4, do_sample=False, return_full_text=False)
    assert "not supported" not in caplog.text
    ids = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"] == tokenizer.decode(expected[0, 3:])
    assert tf.AutoConfig.for_model("calm").__class__ is calm.CALMConfig
