"""Evaluation for any model with `generate` (composed or not): the loss, and exact match of greedy completions
(`is_exact_match`, the one definition of exact match in calm)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .data import (
    PROMPT_COMPLETION,
    PaddingCollator,
    check_token_ids,
    context_length,
    encode_prompts,
    load_examples,
    model_configs,
    pad_token_id,
    tokenize,
)

# What counts as an exact match, by name (`is_exact_match`). Every exact-match score in calm is one of these.
MATCH_MODES = ("stripped", "exact")


class Completion(NamedTuple):
    """A greedy completion: the text before the first EOS, without special tokens (all of the generated text when
    there was no EOS), and whether the model ended it with EOS within `max_new_tokens`."""

    text: str
    ended: bool


def is_exact_match(generated: str, completion: str, match: str = "stripped", ended: bool = True) -> bool:
    """Whether a greedy completion (`generated`, the text before EOS; `ended`: whether EOS came) is exactly the
    expected `completion`. The one definition of exact match in calm, in two modes:

    - "stripped" (the default; `calm eval`, the trainer's `eval_exact_match`): equal once whitespace at either
      end is stripped; the model need not emit EOS (a completion cut by `max_new_tokens` can still match).
    - "exact" (the key-value reproduction): the text before EOS is the completion character for character,
      whitespace included, and the model did emit that EOS (`ended`) within `max_new_tokens`.
    """
    _check_match(match)
    if match == "stripped":
        return generated.strip() == completion.strip()
    return ended and generated == completion


def _check_match(match: str) -> None:
    if match not in MATCH_MODES:
        raise ValueError(f"match={match!r} is invalid: expected one of {MATCH_MODES}")


@torch.no_grad()
def generate_completions(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 32, progress: bool = False, desc: str = "generate",
                         **generate_kwargs: Any) -> list[Completion]:
    """The `Completion` of each prompt, encoded exactly like training prompts and batched with left padding;
    `generate_kwargs` go to `model.generate` (e.g. `do_sample=True, temperature=0.7`)."""
    device = getattr(model, "device", "cpu")
    eos = tokenizer.eos_token_id
    completions: list[Completion] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts[start:start + batch_size]).items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer),
                             eos_token_id=eos, **generate_kwargs)
        for ids in out[:, batch["input_ids"].shape[1]:].tolist():
            ended = eos in ids
            text = tokenizer.decode(ids[: ids.index(eos)] if ended else ids, skip_special_tokens=True)
            completions.append(Completion(text, ended))
    return completions


def greedy_decode(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
                  progress: bool = False, desc: str = "generate", **generate_kwargs: Any) -> list[Completion]:
    """Greedy `Completion` of each prompt (`generate_completions` without sampling or beams)."""
    return generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc,
                                do_sample=False, num_beams=1, **generate_kwargs)


def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 32, progress: bool = False, require_eos: bool = False,
                       desc: str = "generate", **generate_kwargs: Any) -> list[str]:
    """The text of each prompt's greedy completion (`greedy_decode`). With `require_eos`, a completion that never
    reaches EOS is returned as ""."""
    return [c.text if c.ended or not require_eos else "" for c in
            greedy_decode(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc, **generate_kwargs)]


def exact_match_count(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int,
                      batch_size: int = 32, progress: bool = False, match: str = "stripped",
                      **generate_kwargs: Any) -> int:
    """How many `{"prompt", "completion"}` examples get exactly their completion (`is_exact_match` in mode
    `match`)."""
    _check_match(match)
    got = greedy_decode(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size, progress,
                        **generate_kwargs)
    return sum(is_exact_match(g.text, e["completion"], match, g.ended) for g, e in zip(got, examples))


def exact_match(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int, batch_size: int = 32,
                progress: bool = False, match: str = "stripped", **generate_kwargs: Any) -> float:
    """Share of examples whose greedy completion is exactly right (`is_exact_match` in mode `match`)."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    hits = exact_match_count(model, tokenizer, examples, max_new_tokens, batch_size, progress, match,
                             **generate_kwargs)
    return hits / len(examples)


def mean_loss(model: Any, tokenizer: Any, examples: Any, batch_size: int = 32, max_length: int = 2048,
              **forward_kwargs: Any) -> float:
    """Token-weighted mean loss (on completions for prompt/completion data, assistant turns for chat data, else on
    all tokens). Examples are cut to `max_length` and to the model's context; token ids outside its vocabulary
    are a `DataError`.

    A composition in "prompt" augment mode (its config's, or `augment_mode="prompt"` in `forward_kwargs`) is
    scored as it is trained: the augments read each example's prompt only (`augment_length`), never the
    completion whose loss is measured; in "stepwise" mode they read the completion token by token after it."""
    scored = [s for s in example_losses(model, tokenizer, examples, batch_size, max_length, **forward_kwargs) if s]
    return sum(total for total, _ in scored) / max(sum(count for _, count in scored), 1)


@torch.no_grad()
def example_losses(model: Any, tokenizer: Any, examples: Any, batch_size: int = 32, max_length: int = 2048,
                   **forward_kwargs: Any) -> list[tuple[float, int] | None]:
    """Per example (in the dataset's order): (summed loss, number of target tokens), or None for an example left
    without a target token once cut to `max_length`. `mean_loss` says how examples are scored."""
    configs = model_configs(model)
    context = context_length(configs)
    dataset = tokenize(examples, tokenizer, max_length if context is None else min(max_length, context))
    vocab_size = getattr(configs[0].get_text_config(decoder=True), "vocab_size", None) if configs else None
    if isinstance(vocab_size, int):
        check_token_ids(dataset, vocab_size, pad_token_id(tokenizer))
    collate = PaddingCollator(pad_token_id(tokenizer))  # right padding: prompt lengths count columns
    device = getattr(model, "device", "cpu")
    prompt_mode = _augment_mode(model, forward_kwargs.get("augment_mode")) in ("prompt", "stepwise") and \
        "augment_length" not in forward_kwargs
    scores: list[tuple[float, int] | None] = [None] * len(dataset.examples)
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(rows)
        labels = batch["labels"].to(device)
        extra = {"augment_length": batch["augment_length"].to(device)} if prompt_mode else {}
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       **extra, **forward_kwargs).logits
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                                   ignore_index=-100, reduction="none").sum(dim=1)
        counts = (targets != -100).sum(dim=1)
        for row, loss, count in zip(rows, losses.tolist(), counts.tolist()):
            scores[row["source_index"]] = (loss, count)
    return scores


def _augment_mode(model: Any, augment_mode: str | None) -> str | None:
    """The augment mode a forward pass of `model` runs in: `augment_mode` when given, else the composition's own
    (None for a model that is not a composition)."""
    return augment_mode if augment_mode is not None else getattr(getattr(model, "config", None), "augment_mode", None)


def evaluate_file(model: Any, tokenizer: Any, data: Any, max_new_tokens: int = 64, batch_size: int = 32,
                  augment_mode: str | None = None, match: str = "stripped") -> dict[str, float]:
    """Loss and, for prompt/completion data, exact match (`is_exact_match` in mode `match`) of greedy completions
    on a JSONL file or dataset."""
    return evaluate_with_predictions(model, tokenizer, data, max_new_tokens, batch_size, augment_mode, match)[0]


def evaluate_with_predictions(model: Any, tokenizer: Any, data: Any, max_new_tokens: int = 64,
                              batch_size: int = 32, augment_mode: str | None = None,
                              match: str = "stripped") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`evaluate_file`'s metrics, and one record per example: its index and fields, its mean token `loss` (None
    when it has no target token left), and for prompt/completion data the greedy `generated` text, whether the
    model `ended` it with EOS, and whether it is an `exact_match`."""
    _check_match(match)
    examples = load_examples(data)
    mode = {} if augment_mode is None else {"augment_mode": augment_mode}
    scores = example_losses(model, tokenizer, examples, batch_size, **mode)
    scored = [s for s in scores if s]
    metrics: dict[str, float] = {"examples": len(examples),
                                 "loss": sum(t for t, _ in scored) / max(sum(n for _, n in scored), 1)}
    records = [{"index": i, **example, "loss": score[0] / score[1] if score and score[1] else None}
               for i, (example, score) in enumerate(zip(examples.examples, scores))]
    if examples.format == PROMPT_COMPLETION:
        got = greedy_decode(model, tokenizer, [e["prompt"] for e in examples.examples], max_new_tokens, batch_size,
                            **mode)
        for record, example, completion in zip(records, examples.examples, got):
            hit = is_exact_match(completion.text, example["completion"], match, completion.ended)
            record.update(generated=completion.text, ended=completion.ended, exact_match=hit)
        metrics["exact_match"] = sum(r["exact_match"] for r in records) / len(records)
    return metrics, records
