"""torch.compile (BENCHMARKS.md §10, issue 27): a composed training step run eagerly against the same step with the
model compiled by `torch.compile`, on the same batch.

    .venv/bin/python benchmarks/compiled.py [--pair reference] [--repeats 5] [--write]

A step is §1's composed step: forward with labels, backward, AdamW on the composition parameters. The compiled step
calls `torch.compile(model)` (inductor, default mode) instead of `model`: its forward and backward run as compiled
graphs, the optimizer stays eager. Both steps train the same model with the same optimizer, in alternation; the
first compiled call (compilation) is timed apart. `--write` puts the section into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch._dynamo
from common import (
    SHAPES,
    Ratios,
    describe,
    machine,
    make_batch,
    optimizer,
    pair,
    parse,
    parser,
    rounds,
    write_marked_section,
)

import calm


def step(model, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=5, pair_default="reference")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parse(p, argv)

    model = calm.compose(*pair(args.pair), init="random").train()
    compiled = torch.compile(model)
    opt = optimizer(model)
    batch = make_batch(model.anchor.config.vocab_size, *SHAPES[args.pair])
    with torch.no_grad():
        eager_loss = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    compiled_loss = compiled(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss
    compiled_loss.backward()  # compiles the backward graph too
    compile_seconds = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)
    counters = torch._dynamo.utils.counters
    times = rounds({"eager": lambda: step(model, opt, batch), "compiled": lambda: step(compiled, opt, batch)},
                   args.repeats)
    ratio = Ratios(times)
    result = {
        "machine": machine(), "pair": args.pair, "setting": describe(args.pair), "repeats": args.repeats,
        "connections": model.config.connections, "compile_seconds": compile_seconds,
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
        "loss_difference": abs(eager_loss.item() - compiled_loss.item()),
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "speedup": ratio("speedup", ["eager"], ["compiled"]),
    }
    result["speedup_range"] = ratio.ranges["speedup"]
    print(json.dumps(result, indent=2))
    if args.write:
        write_marked_section("compile", "compiled.py", section(result, sys.argv[1:] if argv is None else argv))
    return result


def section(result: dict, argv: list[str]) -> list[str]:
    command = " ".join(["python benchmarks/compiled.py", *argv]).replace(" --write", "")
    low, high = result["speedup_range"]
    seconds = result["seconds"]
    return [
        "## 10. Compiled training step (issue 27)",
        "",
        "One composed training step (§1: forward with labels, backward, AdamW on the composition parameters) run "
        "eagerly and with the model compiled, `torch.compile(model)` (inductor, default mode; the optimizer stays "
        "eager), in alternation on the same batch, the ratio taken round by round. A composed forward compiles "
        "as one graph: the composition's hooks are installed once, at `compose()`, each augment runs as its "
        "decoder cut after its deepest tapped block, and nothing reads a tensor's value on the host "
        "(`tests/test_persistent_hooks.py` asserts no graph break).",
        "",
        f"Command: `{command}`, run once under `nice -n 19`. Machine: {result['machine']}. **CPU only**: inductor "
        "generated C++ kernels; a GPU's figures (Triton kernels, fused attention) would differ.",
        "",
        "| pair | setting | eager step | compiled step | speed-up | range over rounds | compilation (first "
        "step) | graphs, graph breaks | loss: eager − compiled |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['pair']} | {result['setting']}, connections {result['connections'][0]} | "
        f"{seconds['eager']:.2f} s | {seconds['compiled']:.2f} s | {result['speedup']:.2f}× | {low:.2f}–{high:.2f} | "
        f"{result['compile_seconds']:.0f} s | {result['graphs']}, {result['graph_breaks']} | "
        f"{result['loss_difference']:.1e} |",
    ]


if __name__ == "__main__":
    main()
