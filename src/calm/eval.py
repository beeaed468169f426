"""Exact-match evaluation of greedy completions, for any model with `generate` (composed or not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import encode_prompts, pad_token_id


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 32, progress: bool = False, **generate_kwargs: Any) -> list[str]:
    """Greedy completion of each prompt, encoded exactly like training prompts and batched with left padding;
    the text before the first EOS, without special tokens."""
    device = getattr(model, "device", "cpu")
    eos = tokenizer.eos_token_id
    completions: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts[start:start + batch_size]).items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_token_id(tokenizer), eos_token_id=eos, **generate_kwargs)
        for ids in out[:, batch["input_ids"].shape[1]:].tolist():
            if eos in ids:
                ids = ids[: ids.index(eos)]
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    return completions


def exact_match_count(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int,
                      batch_size: int = 32, progress: bool = False, **generate_kwargs: Any) -> int:
    """How many `{"prompt", "completion"}` examples get exactly their completion (both stripped)."""
    got = greedy_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size,
                             progress, **generate_kwargs)
    return sum(g.strip() == e["completion"].strip() for g, e in zip(got, examples))


def exact_match(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int, batch_size: int = 32,
                progress: bool = False, **generate_kwargs: Any) -> float:
    """Share of examples whose greedy completion is exactly right."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    hits = exact_match_count(model, tokenizer, examples, max_new_tokens, batch_size, progress, **generate_kwargs)
    return hits / len(examples)
