"""Shared pieces of the benchmarks: the model pairs they measure, the workloads they time and a robust timer.

Every benchmark compares workloads measured in the same process and reports ratios, never absolute times.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

import calm
from calm.blocks import decoder_blocks

# name -> (anchor layers, anchor width, augment layers, augment width, vocab). "reference" is the setting of
# the reference figures quoted in issue 7 (the paper's code and a community port, measured on this machine).
PAIRS = {
    "small": (8, 512, 6, 256, 32000),
    "reference": (6, 256, 4, 128, 32000),
    "tiny": (4, 32, 4, 16, 96),
}
# name -> (batch, sequence length) of a training batch
SHAPES = {"small": (8, 256), "reference": (8, 128), "tiny": (8, 256)}

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)
States = list[dict[int, torch.Tensor]]


def llama(layers: int, width: int, vocab: int, seed: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                            intermediate_size=4 * width, max_position_embeddings=2048, pad_token_id=0,
                            eos_token_id=None, bos_token_id=None)
    return tf.LlamaForCausalLM(config).eval()


def anchor_of(name: str) -> tf.PreTrainedModel:
    anchor_layers, anchor_width, _, _, vocab = PAIRS[name]
    return llama(anchor_layers, anchor_width, vocab, 0)


def augment_of(name: str, layers: int | None = None) -> tf.PreTrainedModel:
    """The pair's augment; `layers` deepens it (connection sweeps)."""
    _, _, default_layers, augment_width, vocab = PAIRS[name]
    return llama(layers or default_layers, augment_width, vocab, 1)


def pair(name: str, augment_layers: int | None = None) -> tuple[tf.PreTrainedModel, tf.PreTrainedModel]:
    return anchor_of(name), augment_of(name, augment_layers)


def describe(name: str) -> str:
    anchor_layers, anchor_width, augment_layers, augment_width, vocab = PAIRS[name]
    batch, seq = SHAPES[name]
    return (f"anchor {anchor_layers}×{anchor_width}, augment {augment_layers}×{augment_width}, vocab {vocab}, "
            f"batch {batch} × seq {seq}")


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


# ------------------------------------------------------------------------------------------------ workloads


def first_anchor_block(model: calm.CALMForCausalLM) -> int:
    return min(b for conns in model.config.connections for _, b in conns)


def optimizer(model: calm.CALMForCausalLM) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def composed_step(model: calm.CALMForCausalLM, opt: torch.optim.Optimizer, batch: Batch,
                  states: States | None = None) -> None:
    """One training step of the composition: forward, backward, AdamW on the composition parameters."""
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, labels=ids, augment_states=states).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def anchor_backward_from(anchor: tf.PreTrainedModel, block: int, batch: Batch) -> None:
    """Frozen anchor forward + backward in which only activations get gradients, from the output of `block` on.

    This is the anchor work a composed step cannot avoid: the loss must be back-propagated through the anchor
    down to the first block that receives cross-attention, but no anchor weight gets a gradient (the anchor must
    be frozen, as `calm.compose` leaves it)."""
    ids, mask = batch

    def leaf(module, args, output):
        hidden = (output if torch.is_tensor(output) else output[0]).detach().requires_grad_()
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    handle = decoder_blocks(anchor)[block].register_forward_hook(leaf)
    try:
        anchor(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    finally:
        handle.remove()


def anchor_finetune_backward(anchor: tf.PreTrainedModel, batch: Batch) -> None:
    """An ordinary fine-tuning forward + backward of the anchor: every weight gets a gradient (no optimizer)."""
    ids, mask = batch
    anchor.requires_grad_(True)
    try:
        anchor(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    finally:
        anchor.zero_grad(set_to_none=True)
        anchor.requires_grad_(False)


class _Stop(Exception):
    pass


@torch.no_grad()
def augment_forward_to(augment: tf.PreTrainedModel, block: int, batch: Batch) -> torch.Tensor:
    """Augment inference stopped after `block`, as the composition runs it; returns that block's output."""
    states: dict[int, torch.Tensor] = {}

    def stop(module, args, output):
        states[block] = output if torch.is_tensor(output) else output[0]
        raise _Stop

    handle = decoder_blocks(augment)[block].register_forward_hook(stop)
    try:
        augment(input_ids=batch[0], attention_mask=batch[1])
    except _Stop:
        pass
    finally:
        handle.remove()
    return states[block]


def _capture(states: dict[int, torch.Tensor], index: int) -> Callable:
    def hook(module, args, output):
        states[index] = output if torch.is_tensor(output) else output[0]
    return hook


@torch.no_grad()
def naive_augment_states(model: calm.CALMForCausalLM, batch: Batch) -> States:
    """What the paper's reference code does: run each augment to completion (all blocks, final norm and LM head
    over the whole vocabulary) and keep the tapped hidden states."""
    ids, mask = batch
    result: States = []
    for augment, conns in zip(model.augments, model.config.connections):
        states: dict[int, torch.Tensor] = {}
        blocks = decoder_blocks(augment)
        hooks = [blocks[a].register_forward_hook(_capture(states, a)) for a in {a for a, _ in conns}]
        try:
            augment(input_ids=ids, attention_mask=mask)
        finally:
            for hook in hooks:
                hook.remove()
        result.append(states)
    return result


def composition_layers_step(model: calm.CALMForCausalLM, opt: torch.optim.Optimizer, states: States,
                            hidden: torch.Tensor) -> None:
    """The new cross-attention layers alone, fed stand-in anchor states: forward, backward and AdamW. As in the
    composed step, the anchor stream needs no gradient at the first connected block, and does after it."""
    first = first_anchor_block(model)
    updates = []
    for k, conns in enumerate(model.config.connections):
        for j, (a, b) in enumerate(conns):
            layer = model.composition[k][j]
            query = hidden if b == first else hidden.detach().requires_grad_()
            updates.append(layer(query, *layer.keys_values(states[k][a]), "causal"))
    torch.stack(updates).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------- measuring


# The timer of `rounds`. Single-threaded, the process's CPU time equals its wall time on an idle core but leaves
# out the time other processes take from it: on a shared machine, wall times of identical calls swing by half.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = "wall"


def parser(doc: str | None, repeats: int, pair_default: str = "small") -> argparse.ArgumentParser:
    """The options every benchmark shares: --pair, --repeats, --threads, --clock."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default=pair_default, choices=list(PAIRS))
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, multi-threaded timings swing wildly)")
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="process CPU time or wall time (default: cpu with one thread, wall otherwise)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    global clock
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    return args


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds (the median resists noise from other processes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rounds(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: bool = True) -> dict[str, list[float]]:
    """Times (`clock`) of several functions measured in alternation, one list per function with one time per round,
    so a noisy neighbour hurts all alike. The order rotates from round to round: no function always follows
    the same one."""
    if warmup:
        for fn in fns.values():
            fn()
    names, now = list(fns), CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = now()
            fns[name]()
            times[name].append(now() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: bool = True) -> dict[str, float]:
    """Median times of several functions measured in alternation (see `rounds`)."""
    return {name: statistics.median(t) for name, t in rounds(fns, repeats, warmup).items()}


class Ratios:
    """Ratios of sums of workload times, taken round by round (the workloads of one round ran within seconds of
    each other, so slow drifts in the machine's load cancel) and summarised by their median; the range over
    rounds of every ratio is kept in `ranges` to show the noise."""

    def __init__(self, times: dict[str, list[float]]) -> None:
        self.times = times
        self.ranges: dict[str, list[float]] = {}

    def __call__(self, name: str, num: list[str], den: list[str]) -> float:
        per_round = [sum(self.times[k][r] for k in num) / sum(self.times[k][r] for k in den)
                     for r in range(len(self.times[num[0]]))]
        self.ranges[name] = [min(per_round), max(per_round)]
        return statistics.median(per_round)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {clock} clock{load}; "
            f"torch {torch.__version__}, transformers {tf.__version__}, Python {platform.python_version()}")


# ----------------------------------------------------------------------------------------- BENCHMARKS.md

PAGE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
# A section a benchmark run on its own writes; report.py keeps it when it re-renders the page.
MARKED = re.compile(r"<!-- (\w+): written by benchmarks/[\w.]+ -->.*?<!-- /\1 -->", re.S)


def write_marked_section(name: str, script: str, lines: list[str]) -> None:
    """Put `lines` into BENCHMARKS.md between the markers of section `name` (written by benchmarks/`script`):
    in place of its earlier version, or at the end of the page; the rest of the page is untouched."""
    block = "\n".join([f"<!-- {name}: written by benchmarks/{script} -->", *lines, f"<!-- /{name} -->"])
    text = PAGE.read_text()
    old = next((m for m in MARKED.finditer(text) if m.group(1) == name), None)
    text = text[:old.start()] + block + text[old.end():] if old else text.rstrip("\n") + "\n\n" + block + "\n"
    PAGE.write_text(text)
