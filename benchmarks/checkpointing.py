"""Activation checkpointing (BENCHMARKS.md §11, issue 27): peak memory of one long-sequence composed training step
with and without checkpointing the anchor's blocks (`model.activation_checkpointing_enable()`), each workload in a
fresh process so that peaks never mix (peak RSS, as §5).

    .venv/bin/python benchmarks/checkpointing.py [--pair small] [--batch 1] [--seq 4096] [--every 2] [--write]

Only the anchor blocks from the first connected one on keep activations for the backward pass (the loss needs no
gradient below it), so `--every 2` puts that block early, as a real composition's spread connections do.
Workloads: *built* composes the pair and makes the batch and the optimizer, and takes no step (what every process
holds before its step); *plain* and *checkpointed* then take one step (§1: forward with labels, backward, AdamW on
the composition parameters). A step's own peak is its process's peak less *built*'s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import PAIRS, composed_step, machine, make_batch, optimizer, pair, parse, parser, write_marked_section
from memory import peak_rss_mib

import calm

WORKLOADS = ("built", "plain", "checkpointed")


def run_workload(name: str, pair_name: str, batch: int, seq: int, every: int) -> float:
    """Run one workload; the CPU seconds of its step (0 for `built`)."""
    model = calm.compose(*pair(pair_name), every=every, init="random")
    opt = optimizer(model)
    data = make_batch(PAIRS[pair_name][-1], batch, seq)
    if name == "checkpointed":
        model.activation_checkpointing_enable()
    model.train()
    if name == "built":
        return 0.0
    start = time.process_time()
    composed_step(model, opt, data)
    return time.process_time() - start


def worker(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--pair", args.pair, "--batch", str(args.batch),
               "--seq", str(args.seq), "--every", str(args.every), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--every", type=int, default=2, help="tap every k-th augment block (compose's every=)")
    p.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parse(p, argv)
    if args.worker:
        seconds = run_workload(args.worker, args.pair, args.batch, args.seq, args.every)
        print(json.dumps({"peak_mib": peak_rss_mib(), "step_seconds": seconds}))
        return {}

    runs = {name: worker(name, args) for name in WORKLOADS}
    peaks = {name: run["peak_mib"] for name, run in runs.items()}
    built = peaks["built"]
    model = calm.compose(*pair(args.pair), every=args.every)
    result = {
        "machine": machine(), "pair": args.pair, "batch": args.batch, "seq": args.seq,
        "connections": model.config.connections, "peak_mib": peaks,
        "step_seconds": {name: runs[name]["step_seconds"] for name in ("plain", "checkpointed")},
        "step_peak_ratio": (peaks["checkpointed"] - built) / (peaks["plain"] - built),
        "process_peak_ratio": peaks["checkpointed"] / peaks["plain"],
    }
    print(json.dumps(result, indent=2))
    if args.write:
        write_marked_section("checkpointing", "checkpointing.py",
                             section(result, sys.argv[1:] if argv is None else argv))
    return result


def section(result: dict, argv: list[str]) -> list[str]:
    command = " ".join(["python benchmarks/checkpointing.py", *argv]).replace(" --write", "")
    anchor_layers, anchor_width, augment_layers, augment_width, vocab = PAIRS[result["pair"]]
    peaks, seconds, built = result["peak_mib"], result["step_seconds"], result["peak_mib"]["built"]
    return [
        "## 11. Activation checkpointing (issue 27)",
        "",
        "Peak RSS of one long-sequence composed training step (§1's step) with and without checkpointing the "
        "anchor's blocks (`model.activation_checkpointing_enable()`; `TrainingArguments(gradient_checkpointing="
        "True)` does the same): a checkpointed block keeps only its input for the backward pass and runs again "
        "there. Each workload runs in a fresh process (`VmHWM`, as §5); *built* holds the composed models, the "
        "batch and the optimizer and takes no step, and a step's own peak is its process's peak less *built*'s. "
        "Step times are one step's CPU time in each process, indicative only.",
        "",
        f"Command: `{command}`, run once under `nice -n 19`. Machine: {result['machine']}. CPU only.",
        "",
        "| pair | batch × seq | connections (augment, anchor block) | built | plain step | checkpointed step | "
        "step's own peak: checkpointed / plain | process peak: checkpointed / plain | step time: plain, checkpointed |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['pair']}: anchor {anchor_layers}×{anchor_width}, augment {augment_layers}×{augment_width}, "
        f"vocab {vocab} | {result['batch']} × {result['seq']} | {result['connections'][0]} | {built:.0f} MiB | "
        f"{peaks['plain']:.0f} MiB | {peaks['checkpointed']:.0f} MiB | {result['step_peak_ratio']:.3f}× | "
        f"{result['process_peak_ratio']:.3f}× | {seconds['plain']:.1f} s, {seconds['checkpointed']:.1f} s |",
        "",
        f"What checkpointing cannot remove: the logits over the {vocab}-token vocabulary, "
        f"{result['batch'] * result['seq'] * vocab * 4 / 2**20:.0f} MiB a copy in float32, of which the loss and its "
        "backward hold several at once, and the new layers' own activations. A 7B anchor (32 blocks of width "
        "4096, MLP 11008) keeps some 20-30 times more block activations per token than this 8-block one, for "
        "the same logits, so there the anchor's activations, which checkpointing removes, are most of a long "
        "step's peak.",
    ]


if __name__ == "__main__":
    main()
