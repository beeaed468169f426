"""Where does m_A keep a key's value? Linear probes on m_A's hidden states, trained on D_C's keys only.

The composition can only generalise to unseen keys if m_A's states at the positions it reads hold the value in
a form shared by all keys: then a map learned on the 20% of keys in D_C carries over to the rest. This script
fits a linear classifier per layer and per digit of the value on m_A's states over the seen keys and scores it
on the unseen ones, at the first key's token and at the prompt's last token. A probe only has to rank the right
digit first; the composition has to write it. So the script also measures how far the best linear map from the
key's states is from the exact one-hot digits, on seen and unseen keys, and how often that map's largest output
is the right digit at every place of a key.

    python research/kv_arithmetic/kv_probe.py RUN_DIR (a directory written by `calm reproduce kv-arithmetic`)
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from calm.experiments.kv_arithmetic import ExperimentConfig, load_frozen
from calm.tasks.kv_arithmetic import KEY_PAD, make_kv_data

PROMPTS_PER_KEY = 5


@torch.no_grad()
def states_at(model, tokenizer, prompts: list[str], position: str) -> torch.Tensor:
    """(N, layers + 1, D) hidden states at the first key's token ("key") or the prompt's last ("end")."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        first_key = prompt.split("+")[0].rstrip(KEY_PAD)
        index = len(tokenizer(first_key)["input_ids"]) - 1 if position == "key" else len(ids) - 1
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, index] for h in hidden]))
    return torch.stack(rows)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   steps: int = 500) -> float:
    """Accuracy on (test_x, test_y) of an L2-regularised softmax classifier fitted on (train_x, train_y)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    weight = torch.zeros(train_x.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        logits = ((train_x - mean) / std) @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, train_y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (((test_x - mean) / std) @ weight + bias).argmax(-1).eq(test_y).float().mean().item()


def ridge_map(train_x: torch.Tensor, train_y: torch.Tensor, ridge: float = 1e-3
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ridge regression from states to targets fitted on (train_x, train_y), as a function of states (in
    float64)."""
    train_x, train_y = train_x.double(), train_y.double()
    mean, target_mean = train_x.mean(0), train_y.mean(0)
    x = train_x - mean
    weight = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (train_y - target_mean))
    return lambda states: (states.double() - mean) @ weight + target_mean


def one_hot_errors(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   ridge: float = 1e-3) -> tuple[float, float]:
    """Mean squared error per example of a ridge regression from states to `*_y` (one-hot digits), on the
    fitted examples and on the test ones. A value stored as one vector per digit and place would give ~0: this
    is how far a linear map, such as the composition's values, is from writing the exact digits."""
    fitted = ridge_map(train_x, train_y, ridge)

    def error(x: torch.Tensor, y: torch.Tensor) -> float:
        return fitted(x).sub(y.double()).pow(2).sum(-1).mean().item()

    return error(train_x, train_y), error(test_x, test_y)


def nearest_digits_right(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         ridge: float = 1e-3) -> tuple[float, float]:
    """Share of examples, fitted and test, whose every digit the ridge map of `one_hot_errors` gets right when each
    place's ten outputs are read by their largest. A map that writes digits is read like this by m_B at best."""
    fitted = ridge_map(train_x, train_y, ridge)

    def share(x: torch.Tensor, y: torch.Tensor) -> float:
        places = y.shape[-1] // 10
        right = fitted(x).view(-1, places, 10).argmax(-1) == y.view(-1, places, 10).argmax(-1)
        return right.all(-1).double().mean().item()

    return share(train_x, train_y), share(test_x, test_y)


def one_hots(values: torch.Tensor, places: list[int]) -> torch.Tensor:
    """(N, 10 * len(places)): each value's digits at `places`, one-hot, concatenated."""
    return torch.cat([torch.nn.functional.one_hot(values // place % 10, 10) for place in places], -1).float()


def probe(run_dir: Path, seed: int = 0) -> dict[str, list[list[float]]]:
    """Per position ("key", "end") and layer: probe accuracy (%) on unseen keys for each digit of the value,
    most significant first; under "key_one_hot_error", per layer, `one_hot_errors` at the key's token on seen
    and unseen keys, and under "key_nearest_digits" `nearest_digits_right` there (%)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
    task = ExperimentConfig.load(run_dir).task
    data = make_kv_data(task)
    table, keys = data.table, list(data.table)
    marker, pad = task.arithmetic_marker, data.key_pad
    places = [10**i for i in reversed(range(task.value_digits))]
    model = load_frozen(run_dir / "models" / "m_a")
    rng = random.Random(seed)

    def prompts(subset: list[str]) -> tuple[list[str], torch.Tensor]:
        texts = [f"{k}{pad}+{rng.choice(keys)}{pad}{marker}" for k in subset for _ in range(PROMPTS_PER_KEY)]
        return texts, torch.tensor([table[t.split("+")[0].rstrip(KEY_PAD)] for t in texts])

    train_prompts, train_values = prompts(data.seen_keys)
    test_prompts, test_values = prompts(data.unseen_keys)
    torch.manual_seed(seed)
    result = {}
    for position in ("key", "end"):
        train_x = states_at(model, tokenizer, train_prompts, position)
        test_x = states_at(model, tokenizer, test_prompts, position)
        result[position] = [
            [100 * probe_accuracy(train_x[:, layer], train_values // place % 10, test_x[:, layer],
                                  test_values // place % 10) for place in places]
            for layer in range(train_x.shape[1])
        ]
        if position == "key":
            fits = [(train_x[:, layer], one_hots(train_values, places), test_x[:, layer], one_hots(test_values, places))
                    for layer in range(train_x.shape[1])]
            result["key_one_hot_error"] = [list(one_hot_errors(*fit)) for fit in fits]
            result["key_nearest_digits"] = [[100 * share for share in nearest_digits_right(*fit)] for fit in fits]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a `calm reproduce kv-arithmetic` output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = probe(args.run_dir, args.seed)
    width = len(result["key"][0])
    print("| position | layer | " + " | ".join(f"digit {i + 1} (%)" for i in range(width)) + " |")
    print("|---|---:|" + "---:|" * width)
    for position in ("key", "end"):
        for layer, accs in enumerate(result[position]):
            print(f"| {position} | {layer} | " + " | ".join(f"{a:.0f}" for a in accs) + " |")
    print("\ndigit 1 is the most significant; chance: 10% per digit; layer 0 is the embedding output")
    print("\n| layer | one-hot error, D_C's keys | other keys | all digits nearest, D_C's keys (%) | other keys (%) |"
          "\n|---:|---:|---:|---:|---:|")
    for layer, ((seen, unseen), (seen_right, unseen_right)) in enumerate(
            zip(result["key_one_hot_error"], result["key_nearest_digits"], strict=True)):
        print(f"| {layer} | {seen:.2f} | {unseen:.2f} | {seen_right:.1f} | {unseen_right:.1f} |")
    print(f"\na ridge map from the key token's states to its {width} digits' one-hots, fitted on D_C's keys: its "
          "squared error per key (an exact linear code: ~0), and the share of keys whose every digit is its largest "
          "output")


if __name__ == "__main__":
    main()
