"""calm.eval: the loss of a composition as it is trained, and the one definition of exact match."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny
from train_worker import char_tokenizer, sum_examples

import calm
from calm.eval import (
    MATCH_MODES,
    Completion,
    evaluate_file,
    exact_match_count,
    greedy_decode,
    is_exact_match,
    mean_loss,
)
from calm.train import TrainConfig, train


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


# ------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("generated,completion,ended,stripped,exact", [
    ("12", "12", True, True, True),
    (" 12\n", "12", True, True, False),  # whitespace around: forgiven only when stripped
    ("12", " 12", True, True, False),
    ("12", "12", False, True, False),  # no EOS within max_new_tokens: "exact" needs it
    ("123", "12", True, False, False),
    ("", "", False, True, False),
])
def test_is_exact_match_has_two_named_modes(generated, completion, ended, stripped, exact):
    assert is_exact_match(generated, completion, "stripped", ended) is stripped
    assert is_exact_match(generated, completion, "exact", ended) is exact
    assert is_exact_match(generated, completion, ended=ended) is stripped  # the default
    assert MATCH_MODES == ("stripped", "exact")


def test_an_unknown_mode_is_named(tok):
    with pytest.raises(ValueError, match=r"match='loose' is invalid: expected one of \('stripped', 'exact'\)"):
        is_exact_match("1", "1", "loose")
    with pytest.raises(ValueError, match="match='loose'"):
        exact_match_count(Scripted(tok, {}), tok, sum_examples(1), max_new_tokens=2, match="loose")
    with pytest.raises(ValueError, match="TrainConfig.exact_match_mode='loose' is invalid"):
        TrainConfig(exact_match_mode="loose")


class Scripted(torch.nn.Module):
    """Generates a scripted text per prompt, followed by EOS when the script says so."""

    def __init__(self, tokenizer, script: dict[str, tuple[str, bool]]) -> None:
        super().__init__()
        self.tokenizer, self.script = tokenizer, script

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            text, eos = self.script[prompt]
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_id] * eos
            rows.append(ids + (new + [pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_exact_match_count_and_the_kv_reproduction_share_the_definition(tok):
    examples = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"},
                {"prompt": "3+3=", "completion": "6"}, {"prompt": "4+4=", "completion": "8"}]
    script = {"1+1=": ("2", True), "2+2=": (" 4", True), "3+3=": ("6", False), "4+4=": ("9", True)}
    model = Scripted(tok, script)
    assert exact_match_count(model, tok, examples, max_new_tokens=3, batch_size=3) == 3
    assert exact_match_count(model, tok, examples, max_new_tokens=3, batch_size=3, match="exact") == 1
    completions = greedy_decode(model, tok, [e["prompt"] for e in examples], max_new_tokens=3)
    assert completions[1] == Completion(" 4", True) and completions[2] == Completion("6", False)

    from calm.experiments.kv_arithmetic import evaluate_exact_match  # "exact", the reproduction's mode

    result = evaluate_exact_match(model, tok, examples, max_new_tokens=3, batch_size=3)
    assert result.accuracy == 0.25 and result.predictions == ["2", " 4", "", "9"]


def test_the_trainer_and_calm_eval_score_with_the_mode_they_are_given(tok, tmp_path, monkeypatch):
    import calm.train.trainer as trainer

    seen = []
    real = trainer.exact_match_count
    monkeypatch.setattr(trainer, "exact_match_count", lambda *a, **k: seen.append(k["match"]) or real(*a, **k))
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, save_steps=0,
                         plot=False, progress_bar=False, tensorboard=False, exact_match_mode="exact")
    result = train(composed("iterative"), tok, sum_examples(4), sum_examples(4, seed=1), config=config)
    assert seen == ["exact"] and "eval_exact_match" in result.eval_metrics

    model = Scripted(tok, {e["prompt"]: (f" {e['completion']}", True) for e in sum_examples(3)})
    model.config = None  # not a composition: no augment mode
    model.forward = lambda input_ids, **kwargs: type("Out", (), {"logits": torch.zeros(*input_ids.shape, 64)})
    assert evaluate_file(model, tok, sum_examples(3), max_new_tokens=4)["exact_match"] == 1.0
    assert evaluate_file(model, tok, sum_examples(3), max_new_tokens=4, match="exact")["exact_match"] == 0.0
