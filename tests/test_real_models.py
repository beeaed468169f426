"""Real pretrained models with different tokenizers: SmolLM2-135M-Instruct (byte-level BPE, 49k) as the anchor and
Gemma-3 270M (SentencePiece, 262k) as the augment, both from the GGUF packages of the `real` extra."""

from __future__ import annotations

import pytest
import torch
from tokenizer_support import real_model, real_tokenizer

import calm

pytestmark = pytest.mark.slow
PROMPT = "Translate to English: 今日はとても良い天気ですね。散歩に行きましょう。\nEnglish:"


@pytest.fixture(scope="module")
def composed():
    anchor_tok, augment_tok = real_tokenizer("smollm2-135m-instruct"), real_tokenizer("gemma-3-270m")
    model = calm.compose(real_model("smollm2-135m-instruct"), real_model("gemma-3-270m"), tokenizer=anchor_tok,
                         augment_tokenizer=augment_tok, connections=[(5, 19), (11, 29)])
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking weights, so that the augment really changes the anchor's logits
        for name, p in model.composition.named_parameters():
            if name.endswith("o.weight"):
                p.normal_(0.0, 0.02)
    return model.eval(), anchor_tok


@torch.no_grad()
def test_real_pair_generates_exactly_and_without_future_leak(composed):
    model, tok = composed
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    steps = 24  # the checks below re-run the whole sequence at every position: quadratic in its length
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    assert not torch.equal(model(input_ids=ids).logits, model.anchor(input_ids=ids).logits)  # m_A matters

    # 2. Exact cached generation: the loop that re-runs the whole sequence at every step. In fp32 the anchor alone
    # already differs by about 1e-4 between its cached steps and full forwards (other matrix shapes, other
    # summation orders): that floor, measured on the same tokens, bounds the composition's too.
    sequence, worst = ids, 0.0
    for step in range(steps):
        logits = model(input_ids=sequence, use_cache=False, logits_to_keep=1).logits[:, -1]
        worst = max(worst, (logits - out.logits[step]).abs().max().item())
        logits[:, tok.eos_token_id] = float("-inf")
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(sequence, out.sequences)
    alone = model.anchor(input_ids=sequence).logits
    cache, anchor_floor = model.anchor(input_ids=ids, use_cache=True).cache, 0.0
    for t in range(ids.shape[1], sequence.shape[1] - 1):
        step = model.anchor(input_ids=sequence[:, t : t + 1], cache=cache, use_cache=True)
        cache = step.cache
        anchor_floor = max(anchor_floor, (step.logits[:, -1] - alone[:, t]).abs().max().item())
    assert worst < max(1e-4, 2 * anchor_floor), (worst, anchor_floor)

    # 1. Prefix consistency over the prompt and the generated text. The anchor alone already differs by up to
    # ~1e-4 between a full forward and a prefix forward in fp32 (other matrix shapes, other summation orders):
    # that floor, measured here on the same sequence, bounds the composition's too. A leak of future augment
    # tokens would move logits by about the augment's effect, checked above to be far larger.
    full = model(input_ids=sequence).logits
    assert (full - alone).abs().max() > 0.1
    for t in range(sequence.shape[1]):
        prefix = model(input_ids=sequence[:, : t + 1], logits_to_keep=1).logits[:, -1]
        anchor_floor = (model.anchor(input_ids=sequence[:, : t + 1], logits_to_keep=1).logits[:, -1]
                        - alone[:, t]).abs().max().item()
        assert (prefix - full[:, t]).abs().max() < max(1e-4, 2 * anchor_floor), f"position {t}"
