"""Peak memory (BENCHMARKS.md §5): peak RSS of one composed training step against its parts, each workload in
a fresh process so that peaks never mix.

    .venv/bin/python benchmarks/memory.py [--pair small]

Parts = anchor training + augment inference − one bare interpreter (each part's process holds its own copy of
Python, torch and transformers; the composed process holds one).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from common import (
    PAIRS,
    SHAPES,
    anchor_backward_from,
    anchor_of,
    augment_forward_to,
    augment_of,
    composed_step,
    machine,
    make_batch,
    optimizer,
    pair,
    parse,
    parser,
)

import calm
from calm.config import resolve_connections

WORKLOADS = ("bare", "composed", "anchor_activations", "anchor_finetune", "augment_inference")


def run_workload(name: str, pair_name: str) -> None:
    anchor_layers, _, augment_layers, _, vocab = PAIRS[pair_name]
    connections = resolve_connections(augment_layers, anchor_layers)  # the library default, as compose() uses
    batch = make_batch(vocab, *SHAPES[pair_name])
    if name == "composed":
        model = calm.compose(*pair(pair_name), init="random").train()
        composed_step(model, optimizer(model), batch)
    elif name == "anchor_activations":  # frozen anchor: activations get gradients from the first connected block
        anchor_backward_from(anchor_of(pair_name).requires_grad_(False), min(b for _, b in connections), batch)
    elif name == "anchor_finetune":  # ordinary training of the whole anchor: gradients and AdamW on every weight
        anchor = anchor_of(pair_name).requires_grad_(True)
        opt = torch.optim.AdamW(anchor.parameters(), lr=1e-4)
        anchor(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss.backward()
        opt.step()
    elif name == "augment_inference":  # up to the deepest tapped block, as the composition runs it
        augment_forward_to(augment_of(pair_name), max(a for a, _ in connections), batch)


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM, since ru_maxrss survives exec() and so starts at the spawning
    parent's RSS (a worker started by run_all.py would report run_all.py's peak); elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def peak_mib(name: str, pair_name: str, threads: int) -> float:
    """Run one workload in a fresh interpreter; its peak resident set size in MiB."""
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--pair", pair_name, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=1)
    p.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parse(p, argv)
    if args.worker:
        run_workload(args.worker, args.pair)
        print(json.dumps({"peak_mib": peak_rss_mib()}))
        return {}

    peaks = {name: min(peak_mib(name, args.pair, args.threads) for _ in range(args.repeats)) for name in WORKLOADS}
    bare = peaks["bare"]
    parts = peaks["anchor_activations"] + peaks["augment_inference"] - bare
    parts_finetune = peaks["anchor_finetune"] + peaks["augment_inference"] - bare
    result = {
        "machine": machine(), "pair": args.pair, "peak_mib": peaks,
        "composed_over_parts": peaks["composed"] / parts,
        "composed_over_finetune_parts": peaks["composed"] / parts_finetune,
        "composed_over_parts_above_bare": (peaks["composed"] - bare) / (parts - bare),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
