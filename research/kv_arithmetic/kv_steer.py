"""Can m_B be steered through its inputs? Free vectors in the slots of D_C's keys, fitted through frozen m_B.

The composition drives m_B by adding to its inputs at a key's slots (the key token and its pads). If no input
there makes m_B add up the keys' values, no composition will. This script gives each (seen key, slot) a free
vector that replaces m_B's input embedding there, fits the vectors with Adam on D_C's KV-Arithmetic examples
through the frozen m_B, and reports exact match on D_C's two-key prompts and on held-out expressions over the
same keys. It measures m_B alone, with the best possible m_A: compare an m_B trained with
`--digit-mixup 0` (`python -m calm.experiments.kv_arithmetic --out DIR --digit-mixup 0`).

    python research/kv_arithmetic/kv_steer.py RUN_DIR [--steps 300] [--lr 1e-2]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from calm.experiments.kv_arithmetic import ExperimentConfig, collate, load_eval_sets, load_frozen
from calm.tasks.kv_arithmetic import KEY_PAD, Example, make_kv_data, read_jsonl


def key_slots(input_ids: torch.Tensor, key_index: dict[int, int], pad_id: int) -> list[tuple[int, int, int, int]]:
    """(row, position, key, slot) for every slot of every key in a batch: the key token is slot 0, the pad
    tokens right after it slots 1, 2, ..."""
    slots = []
    for row, ids in enumerate(input_ids.tolist()):
        for position, token in enumerate(ids):
            if token in key_index:
                end = position + 1
                while end < len(ids) and ids[end] == pad_id:
                    end += 1
                slots += [(row, p, key_index[token], p - position) for p in range(position, end)]
    return slots


def multi_key_arithmetic(examples: Sequence[Example], marker: str) -> list[Example]:
    """The KV-Arithmetic examples over two keys or more: not single keys, not Numeric-Arithmetic (no key)."""
    return [ex for ex in examples if ex["prompt"].endswith(marker) and not ex["prompt"][0].isdigit()
            and any(op in ex["prompt"] for op in "+-*")]


def steer(run_dir: Path, steps: int = 300, lr: float = 1e-2, batch_size: int = 32, seed: int = 0) -> dict:
    """Exact match (%) of m_B with fitted slot vectors: on D_C's two-key prompts and on held-out ones."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
    task = ExperimentConfig.load(run_dir).task
    data = make_kv_data(task)
    key_index = {tokenizer.convert_tokens_to_ids(k): i for i, k in enumerate(data.seen_keys)}
    pad_id = tokenizer.convert_tokens_to_ids(KEY_PAD)
    model = load_frozen(run_dir / "models" / "m_b")
    embed = model.get_input_embeddings()
    d_c = multi_key_arithmetic(read_jsonl(run_dir / "data" / "composition_train.jsonl"), task.arithmetic_marker)
    held_out = load_eval_sets(run_dir)["kv_arithmetic_seen"]
    width = 1 + len(data.key_pad)
    vectors = torch.nn.Parameter(embed.weight[list(key_index)].detach()[:, None].repeat(1, width, 1))
    optimizer = torch.optim.Adam([vectors], lr=lr)

    def loss_and_hits(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(examples, tokenizer)
        inputs = embed(batch["input_ids"]).detach().clone()
        rows, positions, keys, slots = zip(*key_slots(batch["input_ids"], key_index, pad_id))
        inputs[list(rows), list(positions)] = vectors[list(keys), list(slots)]
        out = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"])
        labels = batch["labels"][:, 1:]
        right = (out.logits[:, :-1].argmax(-1) == labels) | (labels == -100)  # teacher-forced = greedy here
        return out.loss, right.all(-1)

    rng = random.Random(seed)
    for _ in range(steps):
        loss, _ = loss_and_hits(rng.sample(d_c, min(batch_size, len(d_c))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return {name: 100 * loss_and_hits(examples)[1].float().mean().item()
                for name, examples in (("d_c", d_c), ("held_out", held_out))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a `calm reproduce kv-arithmetic` output directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    result = steer(args.run_dir, args.steps, args.lr, seed=args.seed)
    print(f"m_B with fitted slot vectors: {result['d_c']:.1f}% of D_C's two-key KV-Arithmetic prompts, "
          f"{result['held_out']:.1f}% of held-out expressions over the same keys")


if __name__ == "__main__":
    main()
