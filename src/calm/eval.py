"""Exact-match evaluation of greedy completions, for any model with `generate` (composed or not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 32, progress: bool = False, **generate_kwargs: Any) -> list[str]:
    """Greedy completion of each prompt (batched, left padding), decoded without special tokens."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
            new = out[:, batch["input_ids"].shape[1]:]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return completions


def exact_match(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int, batch_size: int = 32,
                progress: bool = False, **generate_kwargs: Any) -> float:
    """Share of `{"prompt", "completion"}` examples whose greedy completion equals the expected one (stripped)."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    got = greedy_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, batch_size,
                             progress, **generate_kwargs)
    hits = sum(g.strip() == e["completion"].strip() for g, e in zip(got, examples))
    return hits / len(examples)
