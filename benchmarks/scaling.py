"""Scaling (BENCHMARKS.md §6): composed training-step time against its parts as the sequence grows (128 → 1024)
and as connections are added (1 → 8, with an 8-block augment so that 8 augment blocks can be tapped).

    .venv/bin/python benchmarks/scaling.py [--batch 2] [--repeats 3] [--plot benchmarks/scaling.png]

Parts = frozen-anchor forward + backward from the first connected block + augment forward to its deepest tap.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    PAIRS,
    Batch,
    Ratios,
    anchor_backward_from,
    composed_step,
    first_anchor_block,
    machine,
    make_batch,
    optimizer,
    pair,
    parse,
    parser,
    rounds,
)

import calm  # noqa: E402

SEQ_LENGTHS = (128, 256, 512, 1024)
CONNECTIONS = (1, 2, 4, 8)
AUGMENT_LAYERS = 8


def workloads(model: calm.CALMForCausalLM, batch: Batch, tag: str) -> dict[str, Callable]:
    opt, first = optimizer(model), first_anchor_block(model)
    return {
        f"{tag}/composed": lambda: composed_step(model, opt, batch),
        f"{tag}/anchor": lambda: anchor_backward_from(model.anchor, first, batch),
        f"{tag}/augment": lambda: model.compute_augment_states(*batch),
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--plot", default=str(Path(__file__).with_name("scaling.png")))
    args = parse(p, argv)

    anchor, augment = pair(args.pair, augment_layers=AUGMENT_LAYERS)
    vocab = PAIRS[args.pair][4]
    default = calm.compose(anchor, augment, init="random").train()
    points = [("seq", length, default, length) for length in SEQ_LENGTHS]
    points += [("connections", n, calm.compose(anchor, augment, num_connections=n, init="random").train(), 256)
               for n in CONNECTIONS]
    fns: dict[str, Callable] = {}
    for sweep, x, model, length in points:
        for fn in workloads(model, make_batch(vocab, 1, 16), "warm-up").values():
            fn()
        fns.update(workloads(model, make_batch(vocab, args.batch, length), f"{sweep}={x}"))
    times = rounds(fns, args.repeats, warmup=False)
    ratio = Ratios(times)

    sweeps: dict[str, dict] = {"seq": {}, "connections": {}}
    for sweep, x, model, _ in points:
        tag = f"{sweep}={x}"
        composed = statistics.median(times[f"{tag}/composed"])
        parts = statistics.median([a + b for a, b in zip(times[f"{tag}/anchor"], times[f"{tag}/augment"])])
        sweeps[sweep][x] = {"composed_s": composed, "parts_s": parts, "connections": model.config.connections,
                            "ratio": ratio(tag, [f"{tag}/composed"], [f"{tag}/anchor", f"{tag}/augment"])}
    result = {"machine": machine(), "pair": args.pair, "augment_layers": AUGMENT_LAYERS, "batch": args.batch,
              "repeats": args.repeats, "connections_at_seq_sweep": default.config.connections, **sweeps,
              "plot": args.plot, "ranges": ratio.ranges}
    plot(sweeps, args, args.plot)
    print(json.dumps(result, indent=2))
    return result


def plot(sweeps: dict[str, dict], args, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"seq": ("sequence length (tokens)", "default connections"),
              "connections": ("connections", "sequence length 256")}
    for ax, (sweep, points) in zip(axes, sweeps.items()):
        xs = list(points)
        ax.plot(xs, [points[x]["composed_s"] for x in xs], "o-", label="composed step")
        ax.plot(xs, [points[x]["parts_s"] for x in xs], "s--", label="anchor fwd+bwd + augment fwd")
        for x in xs:
            ax.annotate(f"{points[x]['ratio']:.2f}×", (x, points[x]["composed_s"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(labels[sweep][0])
        ax.set_ylabel("seconds per step (median)")
        ax.set_title(f"{labels[sweep][1]}, batch {args.batch}")
        ax.legend()
    fig.suptitle(f"CALM training step vs its parts ({args.pair} anchor, {AUGMENT_LAYERS}-block augment; "
                 "labels: composed / parts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
