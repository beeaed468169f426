"""Training cost (issue 7; BENCHMARKS.md §1–3): one composed training step against the sum of its parts,
against the naive way of running the augment (to completion, LM head included), and with cached augment states.

    .venv/bin/python benchmarks/training.py [--pair small] [--repeats 5] [--every 4]

All workloads are timed in alternation in one process on the same batch; figures are ratios of medians.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch
from common import (
    SHAPES,
    Batch,
    Ratios,
    anchor_backward_from,
    anchor_finetune_backward,
    composed_step,
    composition_layers_step,
    describe,
    first_anchor_block,
    machine,
    make_batch,
    naive_augment_states,
    optimizer,
    pair,
    parse,
    parser,
    rounds,
)

import calm
from calm.blocks import decoder_blocks


def workloads(model: calm.CALMForCausalLM, opt: torch.optim.Optimizer, batch: Batch) -> dict[str, Callable]:
    anchor, first = model.anchor, first_anchor_block(model)
    states = model.compute_augment_states(*batch)
    hidden = torch.randn(*batch[0].shape, model.anchor.config.hidden_size)
    return {  # workloads compared with each other run next to each other
        "anchor_activations": lambda: anchor_backward_from(anchor, first, batch),
        "augment_truncated": lambda: model.compute_augment_states(*batch),
        "composed": lambda: composed_step(model, opt, batch),
        "composed_cached": lambda: composed_step(model, opt, batch, states),
        "composition_layers": lambda: composition_layers_step(model, opt, states, hidden),
        "augment_full": lambda: naive_augment_states(model, batch),
        "composed_naive": lambda: composed_step(model, opt, batch, naive_augment_states(model, batch)),
        "anchor_finetune": lambda: anchor_finetune_backward(anchor, batch),
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=5)
    p.add_argument("--every", type=int, default=None,
                   help="tap every k-th augment block (default: the library's default, every 4th)")
    args = parse(p, argv)

    anchor, augment = pair(args.pair)
    model = calm.compose(anchor, augment, every=args.every, init="random").train()
    opt = optimizer(model)
    vocab = anchor.config.vocab_size
    for fn in workloads(model, opt, make_batch(vocab, 1, 16)).values():  # warm-up: every code path once
        fn()
    times = rounds(workloads(model, opt, make_batch(vocab, *SHAPES[args.pair])), args.repeats, warmup=False)
    ratio = Ratios(times)
    acts, trunc, full, layers = ["anchor_activations"], ["augment_truncated"], ["augment_full"], ["composition_layers"]
    result = {
        "machine": machine(), "pair": args.pair, "setting": describe(args.pair), "repeats": args.repeats,
        "connections": model.config.connections, "first_anchor_block": first_anchor_block(model),
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "params_per_connection": sum(p.numel() for p in model.composition[0][0].parameters()),
        "params_per_anchor_block": sum(p.numel() for p in decoder_blocks(anchor)[0].parameters()),
        # §1: composed step / parts, for each meaning of "anchor fwd+bwd" and of "augment fwd"
        "step_over_parts": {
            f"{a}+{b}": ratio(f"step_over_parts/{a}+{b}", ["composed"], [a, b])
            for a in ("anchor_activations", "anchor_finetune") for b in ("augment_truncated", "augment_full")
        },
        "step_over_all_parts": ratio("step_over_all_parts", ["composed"], acts + trunc + layers),
        "composition_layers_share": ratio("composition_layers_share", layers, acts + trunc),
        # §2: the naive way runs the augment to completion, LM head included
        "naive_step_speedup": ratio("naive_step_speedup", ["composed_naive"], ["composed"]),
        "naive_augment_speedup": ratio("naive_augment_speedup", full, trunc),
        # §3: an epoch runs the same step once per batch, so epoch ratios are step ratios
        "cached_epoch_over_anchor_epoch": ratio("cached_epoch_over_anchor_epoch", ["composed_cached"], acts),
        "uncached_epoch_over_anchor_epoch": ratio("uncached_epoch_over_anchor_epoch", ["composed"], acts),
        "cache_speedup": ratio("cache_speedup", ["composed"], ["composed_cached"]),
        "first_cached_epoch_over_anchor_epoch": ratio("first_cached_epoch_over_anchor_epoch",
                                                      ["composed_cached", *trunc], acts),
    }
    result["ranges"] = ratio.ranges
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
