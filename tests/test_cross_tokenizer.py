"""Composing models with different tokenizers: exact, causal and cached (see calm.alignment).

The tokenizers are real: SmolLM2's byte-level BPE, Gemma-3's SentencePiece BPE with byte fallback, and a
character-level one with byte fallback; the models are tiny random Llamas with those vocabularies."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_support import char_tokenizer, real_tokenizer
from transformers import TextIteratorStreamer

import calm
from calm.alignment import MAX_CHUNK_CHARS, TokenizerAligner, same_tokenizer, token_bytes

SMOL, GEMMA, CHAR = "smollm2-135m-instruct", "gemma-3-270m", "char"
HARD_TEXT = ("Hello  world,\tdon't\n\nstop: café e\u0301 naïve 日本語のテキストです。カタカナ、ひらがな！"
             " 🎉👩‍💻 ok   end\n")


def tokenizer(name: str) -> tf.PreTrainedTokenizerBase:
    return char_tokenizer() if name == CHAR else real_tokenizer(name)


def model_for(tok, width: int, layers: int, seed: int, vocab: int | None = None) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab or len(tok), hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * width,
                            max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return tf.LlamaForCausalLM(config).eval()


def composed(anchor_name: str = SMOL, augment_name: str = GEMMA, mode: str = "iterative", init: bool = False):
    anchor_tok, augment_tok = tokenizer(anchor_name), tokenizer(augment_name)
    model = calm.compose(model_for(anchor_tok, 32, 3, 0), model_for(augment_tok, 16, 3, 1),
                         tokenizer=anchor_tok, augment_tokenizer=augment_tok, num_connections=2, augment_mode=mode)
    if not init:
        randomize(model)
    return model.eval(), anchor_tok


def encode(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def prefix_error(model, ids: torch.Tensor) -> float:
    """Largest gap between the full-sequence logits at t and the last logits of a forward over ids[:, :t+1]."""
    full = model(input_ids=ids).logits
    return max((model(input_ids=ids[:, : t + 1], logits_to_keep=1).logits[:, -1] - full[:, t]).abs().max().item()
               for t in range(ids.shape[1]))


# ----------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("name", [SMOL, GEMMA, CHAR])
def test_token_bytes_rebuild_the_text_exactly(name):
    tok = tokenizer(name)
    table = token_bytes(tok)
    ids = tok(HARD_TEXT, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == HARD_TEXT.encode("utf-8")
    assert all(table[i] == b"" for i in tok.all_special_ids)


def test_same_tokenizer_is_decided_by_content_not_size():
    smol, again = real_tokenizer(SMOL), tf.AutoTokenizer.from_pretrained(real_tokenizer(SMOL).name_or_path)
    assert same_tokenizer(smol, again)
    assert not same_tokenizer(smol, real_tokenizer(GEMMA))
    # Same size, one merge rule fewer: not the same tokenizer.
    import json

    spec = json.loads(smol.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    from tokenizers import Tokenizer

    changed = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                         eos_token=smol.eos_token, pad_token=smol.pad_token)
    assert len(changed) == len(smol) and not same_tokenizer(smol, changed)
    # Which token pads is not part of what a tokenizer is.
    padded = tf.AutoTokenizer.from_pretrained(smol.name_or_path)
    padded.pad_token = padded.bos_token
    assert padded.pad_token_id != smol.pad_token_id and same_tokenizer(smol, padded)


def prefixed_variant(scheme: str) -> tf.PreTrainedTokenizerFast:
    """Gemma-3's tokenizer made to add a leading "▁" to every text, as Llama-2 and Mistral tokenizers do: with a
    Prepend normaliser ("normalizer"), or a Metaspace pre-tokeniser with prepend_scheme="first" ("metaspace")."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(real_tokenizer(GEMMA).backend_tokenizer.to_str())
    if scheme == "normalizer":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                  spec["normalizer"]]}
    else:
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>",
                                      eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("augment_name", [SMOL, GEMMA, CHAR, "normalizer", "metaspace"])
def test_chunks_read_plain_text_as_the_whole_text_is_read(augment_name):
    """Chunk by chunk, the augment's tokens of ordinary text are those of the whole text at once, also for
    tokenizers that prefix every text with a space (the chunks after the first are read as continuations)."""
    augment_tok = tokenizer(augment_name) if augment_name in (SMOL, GEMMA, CHAR) else prefixed_variant(augment_name)
    anchor_tok = real_tokenizer(SMOL) if augment_name != SMOL else real_tokenizer(GEMMA)
    text = "The cat sat on the mat, and then it slept. A dog came by: it barked twice!"
    ids = anchor_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    aligner = TokenizerAligner(anchor_tok, augment_tok)
    read = aligner.align(ids, prompt_lengths=torch.tensor([ids.shape[1]]))["input_ids"][0].tolist()
    assert read == aligner.prefix + augment_tok(text, add_special_tokens=False)["input_ids"]


def test_shared_tokenizer_keeps_the_token_path_and_accepts_a_padded_embedding():
    tok = real_tokenizer(SMOL)
    other = tf.AutoTokenizer.from_pretrained(tok.name_or_path)
    anchor, augment = model_for(tok, 32, 2, 0), model_for(tok, 16, 2, 1, vocab=len(tok) + 64)
    model = calm.compose(anchor, augment, tokenizer=tok, augment_tokenizer=other, num_connections=1)
    assert model.aligners == [None] and model.config.augments[0]["shares_tokenizer"] is True
    randomize(model)
    ids = encode(tok, "a shared tokenizer")
    with torch.no_grad():  # the token path: the augment reads the anchor's ids, with no aligner in between
        assert torch.isfinite(model(input_ids=ids).logits).all()
        states = model.compute_augment_states(ids)[0]
    assert next(iter(states.values())).shape[1] == ids.shape[1]


def test_different_tokenizers_need_augment_tokenizer():
    anchor_tok, augment_tok = real_tokenizer(SMOL), real_tokenizer(GEMMA)
    anchor, augment = model_for(anchor_tok, 32, 2, 0), model_for(augment_tok, 16, 2, 1)
    with pytest.raises(ValueError, match="do not share a tokenizer; pass the anchor's tokenizer= and the augment's "
                                         "augment_tokenizer="):
        calm.compose(anchor, augment)
    # Same vocabulary size, but the configs' special token ids tell the tokenizers apart.
    same_size = model_for(anchor_tok, 16, 2, 1)
    same_size.config.eos_token_id = anchor_tok.eos_token_id + 1
    with pytest.raises(ValueError, match=r"augment\[0\] has eos_token_id \d+ against \d+: the models do not share"):
        calm.compose(anchor, same_size)
    with pytest.raises(ValueError, match="augment_tokenizer is given but tokenizer is not"):
        calm.compose(anchor, augment, augment_tokenizer=augment_tok)
    with pytest.raises(ValueError, match="augment_tokenizer is for one augment, but there are 2"):
        calm.compose(anchor, [augment, augment], tokenizer=anchor_tok, augment_tokenizer=augment_tok)
    with pytest.raises(TypeError, match="fast"):
        calm.compose(anchor, augment, tokenizer=anchor_tok, augment_tokenizer=object())


# -------------------------------------------------------------------------------- 1. prefix consistency


PAIRS = [(SMOL, GEMMA), (GEMMA, CHAR), (CHAR, SMOL)]


@pytest.mark.parametrize("anchor_name,augment_name", PAIRS)
def test_full_forward_equals_every_prefix_forward(anchor_name, augment_name):
    model, tok = composed(anchor_name, augment_name)
    ids = encode(tok, HARD_TEXT)
    assert ids.shape[1] > 20
    assert prefix_error(model, ids) < 1e-4


@pytest.mark.parametrize("mode", ["prompt", "stepwise"])
@pytest.mark.parametrize("anchor_name,augment_name", [(SMOL, GEMMA), (CHAR, SMOL)])
@torch.no_grad()
def test_prompt_mode_prefix_consistency(anchor_name, augment_name, mode):
    """With a prompt of P columns, position t of a full forward equals the last position of a forward over the
    first t + 1 columns with the same prompt length, inside the prompt and after it."""
    model, tok = composed(anchor_name, augment_name, mode=mode)
    ids = encode(tok, HARD_TEXT)
    prompt = ids.shape[1] // 2
    full = model(input_ids=ids, augment_length=prompt).logits
    for t in range(ids.shape[1]):
        pre = model(input_ids=ids[:, : t + 1], augment_length=prompt, logits_to_keep=1).logits[:, -1]
        assert (pre - full[:, t]).abs().max() < 1e-4, f"position {t}"
    # Past the prompt, the augment's part is fixed ("prompt") or read token by token ("stepwise"): either
    # differs from iterative reading, which waits for each word.
    assert (full[:, -1] - model(input_ids=ids, augment_mode="iterative").logits[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("anchor_name,augment_name", [(SMOL, GEMMA), (CHAR, SMOL)])
def test_stepwise_reads_the_completion_without_lag_and_nothing_ahead(anchor_name, augment_name):
    """"stepwise": inside the prompt an augment token is seen once its word is complete; after it, a position
    sees exactly the text read so far (up to a UTF-8 character still arriving), and never more."""
    anchor_tok, augment_tok = tokenizer(anchor_name), tokenizer(augment_name)
    aligner = TokenizerAligner(anchor_tok, augment_tok)
    ids = encode(anchor_tok, HARD_TEXT)
    prompt = ids.shape[1] // 2
    inputs = aligner.align(ids, prompt_lengths=torch.tensor([prompt]), stepwise=True)
    anchor_table, augment_table = token_bytes(anchor_tok), token_bytes(augment_tok)
    for t in range(ids.shape[1]):
        read = b"".join(anchor_table[i] for i in ids[0, : t + 1].tolist())
        seen = b"".join(augment_table[i] for i in inputs["input_ids"][0][inputs["visible_from"][0] <= t].tolist())
        assert read.startswith(seen), f"position {t} sees text not yet read"
        if t >= prompt - 1:
            assert read.decode("utf-8", "ignore") == seen.decode("utf-8", "ignore"), f"position {t} lags"


@torch.no_grad()
def test_prompt_mode_with_precomputed_states_in_the_augments_own_tokens():
    """Prompt mode, an int prompt length: states of the augment's own tokens of the prompt give the forward
    without them; states of the whole text (other tokens) are refused by name instead of crashing."""
    model, tok = composed(CHAR, SMOL, mode="prompt")
    ids = encode(tok, HARD_TEXT)
    prompt = ids.shape[1] // 2
    direct = model(input_ids=ids, augment_length=prompt).logits
    states = model.compute_augment_states(ids, augment_inputs=model.align(ids, augment_length=prompt))
    assert torch.allclose(direct, model(input_ids=ids, augment_length=prompt, augment_states=states).logits,
                          atol=1e-5)
    with pytest.raises(ValueError, match=r"augment_states\[0\] do not cover the .* tokens augment 0 reads"):
        model(input_ids=ids, augment_length=prompt, augment_states=model.compute_augment_states(ids))


_prefix_model: dict = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24))
def test_prefix_consistency_on_random_unicode(text):
    if not _prefix_model:
        _prefix_model["m"] = composed(SMOL, GEMMA)
    model, tok = _prefix_model["m"]
    ids = encode(tok, text)
    if ids.shape[1] == 0:
        return
    assert prefix_error(model, ids) < 1e-4


def test_no_augment_token_is_seen_before_its_text_is_complete():
    """Every augment token a position sees holds only text the anchor has fully read by then."""
    anchor_tok, augment_tok = real_tokenizer(SMOL), real_tokenizer(GEMMA)
    aligner = TokenizerAligner(anchor_tok, augment_tok)
    ids = encode(anchor_tok, HARD_TEXT)
    inputs = aligner.align(ids)
    anchor_table, augment_table = token_bytes(anchor_tok), token_bytes(augment_tok)
    for t in range(ids.shape[1]):
        read = b"".join(anchor_table[i] for i in ids[0, : t + 1].tolist())
        visible = inputs["visible_from"][0] <= t
        seen = b"".join(augment_table[i] for i in inputs["input_ids"][0][visible].tolist())
        assert read.startswith(seen)


# ------------------------------------------------------------------------------- 2. cached generation


@torch.no_grad()
def greedy_without_cache(model, ids, mask, steps, mode):
    """Every step re-runs the whole sequence with no cache (EOS ruled out, as min_new_tokens does)."""
    logits_per_step = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, augment_mode=mode, augment_length=None if mode ==
                       "iterative" else prompt_columns, use_cache=False).logits[:, -1]
        logits_per_step.append(logits)
        allowed = logits.clone()
        allowed[:, model.config.eos_token_id] = float("-inf")
        ids = torch.cat([ids, allowed.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(logits_per_step, 1)


prompt_columns = 0


def left_padded(tok, texts):
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


PROMPTS = ["The weather in 東京 is", "Ça va? ", "日本語の文章を書きます。", "a\tb  c"]


@pytest.mark.parametrize("mode", ["iterative", "prompt", "stepwise"])
@pytest.mark.parametrize("anchor_name,augment_name", [(SMOL, GEMMA), (CHAR, SMOL)])
def test_cached_greedy_equals_uncached_recomputation(anchor_name, augment_name, mode):
    global prompt_columns
    model, tok = composed(anchor_name, augment_name, mode)
    ids, mask = left_padded(tok, PROMPTS)
    prompt_columns = ids.shape[1]
    steps = 12
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    reference, reference_logits = greedy_without_cache(model, ids, mask, steps, mode)
    assert torch.equal(out.sequences, reference)
    assert (torch.stack(out.logits, 1) - reference_logits).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["iterative", "prompt", "stepwise"])
def test_left_padded_batch_equals_each_row_alone(mode):
    model, tok = composed(SMOL, GEMMA, mode)
    ids, mask = left_padded(tok, PROMPTS)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, text in enumerate(PROMPTS):
        alone = model.generate(encode(tok, text), **kwargs)
        assert torch.equal(batched[row, -10:], alone[0, -10:])


def test_beam_search_sequences_and_scores_match_uncached():
    model, tok = composed(SMOL, GEMMA)
    with torch.no_grad():  # sharpen the composition so that the beams really diverge
        for p in model.composition.parameters():
            p.mul_(3)
    ids, mask = left_padded(tok, PROMPTS[:2])

    def beam(use_cache):
        return model.generate(ids, attention_mask=mask, num_beams=4, num_return_sequences=2, max_new_tokens=8,
                              do_sample=False, pad_token_id=tok.pad_token_id, use_cache=use_cache,
                              output_scores=True, return_dict_in_generate=True)

    cached, uncached = beam(True), beam(False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.sequences_scores, uncached.sequences_scores, atol=1e-4)


def test_sampling_cached_equals_uncached_and_streaming_works():
    model, tok = composed(SMOL, GEMMA)
    ids = encode(tok, "Sampling: ")
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(model.generate(ids, do_sample=True, top_k=20, top_p=0.9, max_new_tokens=10, min_new_tokens=10,
                                   pad_token_id=tok.pad_token_id, use_cache=use_cache))
    assert torch.equal(*outs)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, ids.shape[1]:])


# ------------------------------------------------------------------------------ 3. identity at init


@pytest.mark.parametrize("anchor_name,augment_name", PAIRS)
def test_identity_at_init(anchor_name, augment_name):
    model, tok = composed(anchor_name, augment_name, init=True)
    ids = encode(tok, HARD_TEXT)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.anchor(input_ids=ids).logits)


# ------------------------------------------------------------------------ 4. iterative decoding, the lag


def test_augment_reads_generated_text_incrementally():
    model, tok = composed(SMOL, GEMMA)
    ids = encode(tok, "Once upon a time ")
    cache = model.new_cache()
    out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         pad_token_id=tok.pad_token_id, cache=cache)
    state = cache.alignments[0]
    prompt_slots = TokenizerAligner(tok, real_tokenizer(GEMMA)).align(ids)["attention_mask"].sum().item()
    # The augment has read past the prompt, and each of its tokens once: its cache holds exactly its slots.
    assert state.counts.item() > prompt_slots
    assert cache.augments[0].get_seq_length() == state.attention_mask.shape[1]
    # What it read is the generated text itself, minus the chunk still open.
    augment_tok = real_tokenizer(GEMMA)
    read = augment_tok.decode(model.align(out)[0]["input_ids"][0], skip_special_tokens=True)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(read)


def lags(anchor_tok, augment_tok, text: str) -> list[int]:
    """Per anchor position: characters of the text read so far that the augment has not yet made visible."""
    ids = encode(anchor_tok, text)
    inputs = TokenizerAligner(anchor_tok, augment_tok).align(ids)
    anchor_table, augment_table = token_bytes(anchor_tok), token_bytes(augment_tok)
    out = []
    for t in range(ids.shape[1]):
        read = b"".join(anchor_table[i] for i in ids[0, : t + 1].tolist()).decode("utf-8", "ignore")
        seen = b"".join(augment_table[i] for i in inputs["input_ids"][0][inputs["visible_from"][0] <= t].tolist())
        out.append(len(read) - len(seen.decode("utf-8", "ignore")))
    return out


def test_the_lag_is_the_unfinished_word():
    """Measured: on English the augment is behind by the word being read (with its leading space); on text
    without spaces, by at most MAX_CHUNK_CHARS characters."""
    anchor_tok, augment_tok = real_tokenizer(SMOL), real_tokenizer(GEMMA)
    english = "The quick brown fox jumps over the lazy dog, and then it rests."
    lag = lags(anchor_tok, augment_tok, english)
    longest_word = max(len(w) for w in english.replace(",", " ").replace(".", " ").split())
    assert max(lag) <= longest_word + 1
    assert 2 <= sum(lag) / len(lag) <= 6  # measured: 4.2 characters on average, 6 at most
    japanese = "吾輩は猫である名前はまだ無いどこで生れたかとんと見当がつかぬ何でも薄暗いじめじめした所で"
    lag = lags(anchor_tok, augment_tok, japanese)
    assert max(lag) <= MAX_CHUNK_CHARS and max(lag) >= MAX_CHUNK_CHARS // 2


# ---------------------------------------------------------------------------------------- save / load


def test_save_load_keeps_tokenizers_and_refuses_another(tmp_path):
    model, tok = composed(SMOL, GEMMA)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "augment_tokenizer_0" / "tokenizer.json").is_file()
    record = model.config.augments[0]
    assert record["shares_tokenizer"] is False and len(record["tokenizer_fingerprint"]) == 64
    loaded = calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=model.anchor, augments=[model.augments[0]])
    assert loaded.aligners[0] is not None and same_tokenizer(loaded.tokenizer, tok)
    ids = encode(tok, HARD_TEXT)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"augment_tokenizers\[0\] is not the tokenizer this composition was "
                                         "trained with"):
        calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=model.anchor, augments=[model.augments[0]],
                                             augment_tokenizers=[char_tokenizer()])
    with pytest.raises(ValueError, match="tokenizer is not the tokenizer this composition was trained with"):
        calm.CALMForCausalLM.from_pretrained(tmp_path, anchor=model.anchor, augments=[model.augments[0]],
                                             tokenizer=real_tokenizer(GEMMA))


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["iterative", "prompt", "stepwise"])
def test_training_with_collator_alignment_and_augment_state_cache(tmp_path, mode):
    from calm.data import PaddingCollator, tokenize
    from calm.train import TrainConfig, train

    data = [{"prompt": f"{a} plus {b} is ", "completion": f"{a + b}. 日本"} for a in range(6) for b in range(4)]
    losses = []
    for cached in (False, True):
        model, tok = composed(SMOL, GEMMA, mode, init=True)
        torch.manual_seed(0)
        config = TrainConfig(output_dir=str(tmp_path / f"run{cached}"), per_device_train_batch_size=4, max_steps=6,
                             logging_steps=1, save_steps=0, progress_bar=False, learning_rate=1e-3, seed=0,
                             cache_augment_states=cached, num_train_epochs=3)
        result = train(model, tok, data, config=config)
        losses.append(result.train_loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # The collator, not the forward pass, builds the augment's ids and alignment.
    model, tok = composed(SMOL, GEMMA, mode)
    rows = tokenize(data[:3], tok, 64).rows
    batch = PaddingCollator(tok.pad_token_id, aligners=model.aligners, augment_mode=mode)(rows)
    assert batch["augment_inputs"][0]["input_ids"].shape[0] == 3
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "augment_length": batch["augment_length"]}  # the prompts' lengths (right padding)
    with torch.no_grad():
        given = model(**inputs, augment_inputs=batch["augment_inputs"]).logits
        computed = model(**inputs).logits
    assert torch.equal(given, computed)


@torch.no_grad()
def test_right_padded_batch_rows_equal_each_row_alone():
    model, tok = composed(SMOL, GEMMA)
    tok.padding_side = "right"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    logits = model(**batch).logits
    for row, text in enumerate(PROMPTS):
        alone = model(input_ids=encode(tok, text)).logits[0]
        assert (logits[row, : alone.shape[0]] - alone).abs().max() < 1e-4


def test_the_collator_can_run_in_data_loader_workers():
    """The aligners travel to worker processes (pickled) and align there as in the main process."""
    import pickle

    from calm.data import PaddingCollator, tokenize

    model, tok = composed(CHAR, GEMMA)
    rows = tokenize([{"text": "Workers align too. 日本語。"}, {"text": "Short one"}], tok, 64).rows
    collator = PaddingCollator(tok.pad_token_id, aligners=model.aligners)
    copied = pickle.loads(pickle.dumps(collator))
    here, there = collator(rows)["augment_inputs"][0], copied(rows)["augment_inputs"][0]
    assert all(torch.equal(here[name], there[name]) for name in here)
