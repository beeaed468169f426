"""calm.eval: the loss of a composition as it is trained, and the one definition of exact match."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny
from train_worker import char_tokenizer, sum_examples

import calm
from calm.eval import evaluate_file, mean_loss


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def composed(augment_mode: str) -> calm.CALMForCausalLM:
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    model = calm.compose(anchor, augment, augment_mode=augment_mode)
    randomize(model)  # identity init would hide what the augment reads
    return model


@torch.no_grad()
def manual_loss(model, tok, examples, **forward_kwargs) -> float:
    """Token-weighted loss, one example at a time, on the completion and its EOS."""
    total, count = 0.0, 0
    for e in examples:
        prompt = tok(e["prompt"])["input_ids"]
        ids = prompt + tok(e["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = [-100] * len(prompt) + ids[len(prompt):]
        kwargs = {k: (len(prompt) if v == "PROMPT" else v) for k, v in forward_kwargs.items()}
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), **kwargs)
        n = len(ids) - len(prompt)
        total, count = total + float(out.loss) * n, count + n
    return total / count


def test_a_prompt_mode_composition_is_scored_with_the_augments_reading_only_the_prompt(tok):
    model = composed("prompt")
    examples = sum_examples(6)
    got = mean_loss(model, tok, examples, batch_size=4)  # two batches, padded on the right
    expected = manual_loss(model, tok, examples, augment_length="PROMPT")
    iterative = manual_loss(model, tok, examples, augment_mode="iterative")
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(got - iterative) > 1e-3  # the augments reading the completion too: another loss
    # An override of the mode reaches the loss as well (`calm eval --augment-mode`).
    assert mean_loss(model, tok, examples, batch_size=4, augment_mode="iterative") == pytest.approx(iterative, rel=1e-5)
    assert evaluate_file(model, tok, examples, max_new_tokens=3, batch_size=4)["loss"] == pytest.approx(expected,
                                                                                                       rel=1e-5)


def test_an_iterative_composition_can_be_scored_in_prompt_mode(tok):
    model = composed("iterative")
    examples = sum_examples(5, seed=3)
    prompt = manual_loss(model, tok, examples, augment_mode="prompt", augment_length="PROMPT")
    metrics = evaluate_file(model, tok, examples, max_new_tokens=3, batch_size=2, augment_mode="prompt")
    assert metrics["loss"] == pytest.approx(prompt, rel=1e-5)
    assert mean_loss(model, tok, examples, batch_size=2) == pytest.approx(manual_loss(model, tok, examples), rel=1e-5)
