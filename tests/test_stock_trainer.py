"""A plain `transformers.Trainer` resumes a composition checkpoint and reloads the best one at the end: the
composition saves its weights as `model.safetensors`, under the model's own names, which is what it loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import tiny
from safetensors.torch import load_file
from train_worker import char_tokenizer, sum_examples

import calm
from calm.data import PaddingCollator, tokenize
from calm.train.trainer import CompositionTrainer


def composed() -> calm.CALMForCausalLM:
    anchor, augment = tiny("llama", 32, 2, 4, seed=0), tiny("qwen2", 16, 2, 2, seed=1)
    torch.manual_seed(0)
    return calm.compose(anchor, augment)


def rows(count: int = 16, length: int = 8) -> list[dict[str, list[int]]]:
    """Fixed-length examples the Trainer's default collator stacks as they are."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (count, length), generator=generator).tolist()
    return [{"input_ids": i, "attention_mask": [1] * length, "labels": i} for i in ids]


def arguments(output_dir: Path, **overrides) -> tf.TrainingArguments:
    options = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                   learning_rate=1e-2, logging_steps=1, report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
    return tf.TrainingArguments(**{**options, **overrides})


def weights(model: calm.CALMForCausalLM) -> dict[str, torch.Tensor]:
    return {f"composition.{k}": v.detach().clone() for k, v in model.composition.state_dict().items()}


def test_a_stock_trainer_resumes_a_composition_checkpoint(tmp_path):
    straight = composed()
    first = tf.Trainer(model=straight, args=arguments(tmp_path / "straight"), train_dataset=rows())
    first.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert set(load_file(checkpoint / "model.safetensors")) == set(weights(straight))

    resumed = composed()
    trainer = tf.Trainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    # The checkpoint's history, then steps 3 and 4 only, with the losses the uninterrupted run had.
    losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    assert losses == [(r["step"], pytest.approx(r["loss"], abs=1e-5)) for r in first.state.log_history if "loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    expected = weights(straight)
    for name, value in weights(resumed).items():  # as if never interrupted: the checkpoint's weights were loaded
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_loading_a_checkpoint_state_dict_reports_nothing_missing_and_refuses_what_does_not_fit(tmp_path):
    model = composed()
    state = {k: torch.full_like(v, 0.5) for k, v in weights(model).items()}
    result = model.load_state_dict(state, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])  # the frozen bases are never in it
    assert all(torch.equal(v, state[k]) for k, v in weights(model).items())
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match=r"the state dict does not fit calm_config\.json: missing \['0\.0\."):
        model.load_state_dict(state, strict=False)  # strict or not: never a half-loaded composition


@pytest.mark.parametrize("trainer_class", [tf.Trainer, CompositionTrainer])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, trainer_class):
    model = composed()
    tokenizer = char_tokenizer()
    data = tokenize(sum_examples(16), tokenizer, max_length=32)
    # The "best" checkpoint is the one with the highest eval loss: an early one, never the last.
    args = arguments(tmp_path, max_steps=3, save_steps=1, eval_strategy="steps", eval_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                     remove_unused_columns=False)
    collator = PaddingCollator(tokenizer.pad_token_id)
    extra = {"exact_match": False} if trainer_class is CompositionTrainer else {"data_collator": lambda batch: {
        k: v for k, v in collator(batch).items() if k not in ("example_index", "augment_length")}}
    trainer = trainer_class(model=model, args=args, train_dataset=data, eval_dataset=data,
                            **({"data_collator": collator} | extra))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-3"
    saved = load_file(best / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    assert all(torch.equal(v, saved[k]) for k, v in weights(model).items())
