"""Cached generation is exact: it matches recomputing the whole forward pass at every step."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import ARCHS, VOCAB, randomize, tiny
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import calm
from calm.cache import CALMCache


def composed(arch: str = "llama", augment_arch: str = "qwen2", mode: str = "iterative"):
    model = calm.compose(tiny(arch, 32, 4, 4, seed=0), tiny(augment_arch, 16, 4, 2, seed=1),
                         num_connections=2, augment_mode=mode)
    randomize(model)
    return model.eval()


def left_padded(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6, 3][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@torch.no_grad()
def greedy_without_cache(model, ids, mask, steps, mode):
    """The reference: every step recomputes the full forward pass over the whole sequence, no cache. EOS is
    never picked, as `generate(min_new_tokens=steps)` rules it out."""
    prompt_length = ids.shape[1]
    all_logits = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, augment_mode=mode, augment_length=prompt_length,
                       use_cache=False).logits[:, -1]
        all_logits.append(logits)
        allowed = logits.clone()
        allowed[:, model.config.eos_token_id] = float("-inf")
        ids = torch.cat([ids, allowed.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(all_logits, 1)


@pytest.mark.parametrize("mode", ["iterative", "prompt"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached_recomputation(arch, batch, mode):
    model = composed(arch, arch, mode)
    ids, mask = left_padded(batch)
    steps = 8
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    expected_ids, expected_logits = greedy_without_cache(model, ids, mask, steps, mode)
    assert torch.equal(out.sequences, expected_ids)
    assert torch.allclose(torch.stack(out.logits, 1), expected_logits, atol=1e-4)


def test_prompt_mode_differs_from_iterative_and_per_call_override():
    model = composed(mode="iterative")
    ids, mask = left_padded(4)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    iterative = model.generate(ids, **kwargs)
    prompt = model.generate(ids, augment_mode="prompt", **kwargs)
    assert not torch.allclose(torch.stack(iterative.logits), torch.stack(prompt.logits), atol=1e-4)
    # "stepwise" changes only how a different-tokenizer augment cuts the text: with a shared one it is iterative.
    stepwise = model.generate(ids, augment_mode="stepwise", **kwargs)
    assert torch.equal(stepwise.sequences, iterative.sequences)
    assert torch.allclose(torch.stack(stepwise.logits), torch.stack(iterative.logits), atol=1e-5)
    with pytest.raises(ValueError, match="augment_mode"):
        model.generate(ids, augment_mode="encoder", **kwargs)


def test_cache_grows_incrementally_and_covers_every_part():
    model = composed()
    ids, mask = left_padded(2)
    cache = model.new_cache()
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == ids.shape[1]
    assert all(layer.keys.shape[-2] == ids.shape[1] for conns in cache.projected for layer in conns)
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.get_seq_length() == ids.shape[1] + 1
    assert cache.augments[0].get_seq_length() == ids.shape[1] + 1
    assert all(layer.keys.shape[-2] == ids.shape[1] + 1 for conns in cache.projected for layer in conns)
    # anchor layers + augment layers + one projected layer per connection
    assert len(cache.layers) == 4 + 4 + 2


def test_augment_reads_only_new_tokens_when_cached():
    """A decoding step runs one incremental pass of each model, never the prefix again."""
    model = composed()
    ids, mask = left_padded(2)
    seen: list[int] = []
    model.augments[0].model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert seen == [ids.shape[1], 1, 1, 1, 1]


def beam(model, ids, mask, use_cache):
    return model.generate(ids, attention_mask=mask, num_beams=4, num_return_sequences=2, max_new_tokens=8,
                          min_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=use_cache,
                          return_dict_in_generate=True, output_scores=True)


def test_beam_search_reorders_every_part_of_the_cache(monkeypatch):
    model = composed()
    with torch.no_grad():  # sharpen the composition so beams really diverge
        for conns in model.composition:
            for layer in conns:
                layer.o.weight.mul_(5)
    ids, mask = left_padded(2)
    cached, uncached = beam(model, ids, mask, True), beam(model, ids, mask, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.sequences_scores, uncached.sequences_scores, atol=1e-5)

    # The same comparison catches a cache that forgets to reorder the projected augment keys/values.
    original_init = CALMCache.__init__

    def init_without_projected_layers(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.layers = self.layers[: -sum(map(len, self.projected))]

    monkeypatch.setattr(CALMCache, "__init__", init_without_projected_layers)
    broken = beam(model, ids, mask, True)
    assert not (torch.equal(broken.sequences, uncached.sequences)
                and torch.allclose(broken.sequences_scores, uncached.sequences_scores, atol=1e-5))


def test_sampling_top_k_top_p_and_return_sequences():
    model = composed()
    ids, mask = left_padded(2)
    torch.manual_seed(0)
    a = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                       max_new_tokens=6, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(0)
    b = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                       max_new_tokens=6, num_return_sequences=3, pad_token_id=0, use_cache=False)
    assert a.shape == (6, ids.shape[1] + 6)
    assert torch.equal(a, b)  # same seed: cached and uncached sample the same tokens


def test_eos_and_stopping_criteria():
    model = composed()
    ids, mask = left_padded(1)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    assert stopped.shape[1] <= ids.shape[1] + 3 and int(stopped[0, -1]) == eos

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 2, dtype=torch.bool)

    short = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([AfterTwo()]))
    assert short.shape[1] == ids.shape[1] + 2


def test_streaming_with_text_iterator_streamer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")
    model = composed()
    ids, mask = left_padded(1)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", model.generate(
        ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
        streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    new = result["out"][0, ids.shape[1]:]
    assert text.split() == tokenizer.decode(new).split()
    assert len(text.split()) == 5


def test_unsupported_caches_raise():
    model = composed()
    ids, mask = left_padded(1)
    with pytest.raises(NotImplementedError, match="static"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    with pytest.raises(ValueError, match="CALMCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=DynamicCache(), pad_token_id=0)


def test_past_key_values_is_accepted_as_deprecated_alias():
    model = composed()
    ids, mask = left_padded(2)
    cache = model.new_cache()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert cache.get_seq_length() == ids.shape[1] and torch.allclose(a, b, atol=1e-6)
