"""What does the composition write into a key's slots, and how well does m_B read it?

With keys padded to a value's width, the composition's job is to write each key's digits into its slots of m_B's
input. This script splits its errors in two. Writing: for each slot, is the digit embedding nearest (by cosine)
to what the composition wrote there the key's digit? Reading: exact match of m_B on KV-Arithmetic when it reads
the slots as written, and when each slot is first snapped to its nearest digit embedding. Everything but the
slots is m_B's own embedding, during generation too, so "as written" is close to, not the same as, the composed
model's score.

    python research/kv_arithmetic/kv_slots.py RUN_DIR [--composition RUN_DIR/runs/calm]
"""

from __future__ import annotations

import argparse
import re
import string
from collections.abc import Sequence
from pathlib import Path

import torch
from kv_steer import key_slots
from transformers import PreTrainedTokenizerFast

import calm
from calm.experiments.kv_arithmetic import ExperimentConfig, load_eval_sets, load_frozen
from calm.tasks.kv_arithmetic import KEY_PAD, make_kv_data


class SlotReader:
    """m_B's input embeddings with the composition's update on a prompt's key slots (connection -1 -> -1)."""

    def __init__(self, run_dir: Path, composition: Path) -> None:
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
        self.m_a, self.m_b = load_frozen(run_dir / "models" / "m_a"), load_frozen(run_dir / "models" / "m_b")
        model = calm.CALMForCausalLM.from_pretrained(str(composition), anchor=self.m_b, augments=[self.m_a])
        connections = [list(c) for c in model.config.connections[0]]
        if [-1, -1] not in connections:
            raise ValueError(f"{composition} has no connection from m_A's embeddings into m_B's input")
        self.layer = model.composition[0][connections.index([-1, -1])]
        self.embed = self.m_b.get_input_embeddings().weight
        self.digit_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(string.digits)))
        self.task = ExperimentConfig.load(run_dir).task
        self.data = make_kv_data(self.task)
        self.key_index = {i: k for k, i in enumerate(self.tokenizer.convert_tokens_to_ids(list(self.data.table)))}
        self.pad_id = self.tokenizer.convert_tokens_to_ids(KEY_PAD)

    @torch.no_grad()
    def written(self, prompt: str) -> tuple[torch.Tensor, list[int]]:
        """m_B's input embeddings for `prompt` (T, D) with the composition's update on the key slots, and the
        slots' positions (every key token and pad)."""
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        anchor = self.m_b.get_input_embeddings()(ids)
        keys, values = self.layer.keys_values(self.m_a.get_input_embeddings()(ids))
        update = self.layer(anchor, keys, values, "causal")[0]
        slots = [position for _, position, _, _ in key_slots(ids, self.key_index, self.pad_id)]
        x = anchor[0].clone()
        x[slots] += update[slots]
        return x, slots

    def nearest_digit(self, x: torch.Tensor) -> torch.Tensor:
        """Index (0-9) of the digit embedding nearest by cosine to each row of `x`."""
        digits = torch.nn.functional.normalize(self.embed[self.digit_ids], dim=-1)
        return torch.nn.functional.normalize(x, dim=-1).matmul(digits.T).argmax(-1)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, max_new_tokens: int) -> str:
        """m_B's greedy completion of input embeddings `x` (T, D), up to its EOS."""
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = self.m_b(inputs_embeds=x[None]).logits[0, -1].argmax().item()
            if token == self.tokenizer.eos_token_id:
                return self.tokenizer.decode(out).replace(" ", "")
            out.append(token)
            x = torch.cat([x, self.embed[token][None]])
        return ""  # no EOS: wrong, as in the main evaluation


def slot_digits(table: dict[str, int], prompt: str, width: int) -> list[int]:
    """The digit each slot of a key prompt should hold: each key's value in `width` digits, in prompt order."""
    keys = [k.rstrip(KEY_PAD) for k in re.split(r"[-+*]", prompt.rstrip("="))]
    return [int(c) for key in keys for c in str(table[key]).zfill(width)]


def measure(run_dir: Path, composition: Path, limit: int = 300) -> dict[str, dict[str, float]]:
    """Per KV-Arithmetic split (its first `limit` examples): writing accuracy per digit place (%, over every
    key), and m_B's exact match (%) reading the slots as written and snapped to their nearest digits."""
    reader = SlotReader(run_dir, composition)
    width = reader.task.value_digits
    eval_sets, result = load_eval_sets(run_dir), {}
    for split in ("kv_arithmetic_seen", "kv_arithmetic_unseen"):
        examples = eval_sets[split][:limit]
        hits, as_written, snapped = torch.zeros(width), 0, 0
        for example in examples:
            x, slots = reader.written(example["prompt"])
            nearest = reader.nearest_digit(x[slots])
            right = nearest.eq(torch.tensor(slot_digits(reader.data.table, example["prompt"], width)))
            hits += right.float().view(-1, width).mean(0)
            max_new = len(example["completion"]) + 1
            as_written += reader.complete(x, max_new) == example["completion"]
            x[slots] = reader.embed[reader.digit_ids[nearest]]
            snapped += reader.complete(x, max_new) == example["completion"]
        n = len(examples)
        result[split] = {**{f"digit {i + 1} written": 100 * h / n for i, h in enumerate(hits.tolist())},
                         "m_B, slots as written": 100 * as_written / n, "m_B, slots snapped": 100 * snapped / n}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a `calm reproduce kv-arithmetic` output directory")
    parser.add_argument("--composition", type=Path, default=None, help="default: RUN_DIR/runs/calm")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.run_dir, args.composition or args.run_dir / "runs" / "calm")
    columns = list(next(iter(result.values())))
    print("| split | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for split, row in result.items():
        print(f"| {split} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    print("\ndigit i written: % of keys whose i-th slot's nearest digit embedding (cosine) is the value's i-th digit "
          "(1: most significant); m_B: exact match")


if __name__ == "__main__":
    main()
