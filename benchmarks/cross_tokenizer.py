"""Cross-tokenizer composition (BENCHMARKS.md §7): an anchor and an augment with different tokenizers, against
the same-sized models sharing the anchor's tokenizer (the original token-for-token path).

    .venv/bin/python benchmarks/cross_tokenizer.py [--pair small] [--tokenizers smollm2+gemma] [--repeats 5]
        [--gen-repeats 3] [--batch 4] [--seq 256] [--new-tokens 32 64 128]

Both compositions are built from the same random Llama sizes (`common.PAIRS`), each model's vocabulary the size
of its tokenizer: the *cross* composition reads the augment through its own tokenizer (`calm.alignment`), the
*same* one has the augment on the anchor's tokenizer. Inputs are real text (`sample_text.py`: English prose with
one Japanese passage) tokenised by the anchor's tokenizer.

- Training: one step = forward with labels + backward + AdamW on the composition parameters. The cross step gets
  `augment_inputs` from `model.align(...)`, made outside the timed step as a data collator makes it; that
  alignment is timed on its own. Cached variants (augment states computed beforehand) and the augment passes
  alone split a difference between the steps into the augment's part and the composition's.
- Generation: greedy, cached, batch 1, after a prompt of the text's first tokens, for several numbers of new
  tokens, both compositions in alternation. The decoded tokens are forced to be the text's next ones
  (`FollowText`), so that the alignment reads real words; free-running greedy decoding of the random models is
  timed too. The composition layers' output projections are zeroed first, so that free-running, both
  compositions decode exactly the anchor's own tokens. The alignment's own per-token cost is timed alone by
  feeding the text one token at a time, as generation does.

All workloads are timed in alternation in one process (`common.rounds`); figures are medians of per-round ratios.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import sample_text
import torch
from common import CLOCKS, PAIRS, Batch, Ratios, composed_step, llama, machine, optimizer, parse, parser, rounds
from transformers import LogitsProcessor, LogitsProcessorList

import calm
from calm.alignment import AlignmentState
from calm.layers import CrossAttention

TESTS = Path(__file__).resolve().parent.parent / "tests"
# short name -> name for tests/tokenizer_support.py's real_tokenizer (None: its character-level tokenizer)
TOKENIZERS = {"smollm2": "smollm2-135m-instruct", "gemma": "gemma-3-270m", "char": None}
PAIRINGS = ("smollm2+gemma", "char+gemma", "char+smollm2", "gemma+smollm2")
# pair -> (batch, sequence length) of a training batch. The anchor's vocabulary (49152 with SmolLM2's tokenizer,
# against 32000 in the other benchmarks) makes the LM head costlier: the small pair's batch is 4, the tiny one's
# sequences 128 long.
SHAPES = {"small": (4, 256), "reference": (8, 128), "tiny": (8, 128)}


def load_tokenizer(name: str):
    """The tokenizers of the cross-tokenizer tests (tests/tokenizer_support.py): real ones are converted once from
    the installed GGUF packages and cached on disk by `calm.packaged` (~/.cache/calm)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import pytest
    from tokenizer_support import char_tokenizer, real_tokenizer

    # New objects every time (the helpers memoise theirs), so that composing sees tokenizers it has never read.
    if TOKENIZERS[name] is None:
        return char_tokenizer.__wrapped__()
    try:
        return real_tokenizer.__wrapped__(TOKENIZERS[name])
    except pytest.skip.Exception as e:  # the package that ships the GGUF file is not installed
        raise SystemExit(f"cross_tokenizer.py: tokenizer {name!r} is unavailable: {e}") from None


def text_batch(tokenizer, batch: int, seq: int) -> Batch:
    """`batch` rows of `seq` anchor tokens of the sample text, starting at evenly spaced offsets (wrapping
    around), without padding."""
    ids = tokenizer(sample_text.corpus(), add_special_tokens=False)["input_ids"]
    stream = ids * (seq // len(ids) + 2)
    rows = [stream[i * len(ids) // batch:][:seq] for i in range(batch)]
    tensor = torch.tensor(rows)
    return tensor, torch.ones_like(tensor)


def compositions(pair: str, anchor_tok, augment_tok, connections: int
                 ) -> tuple[calm.CALMForCausalLM, calm.CALMForCausalLM, dict[str, float]]:
    """(same, cross, seconds of `calm.compose`): the same sizes and seeds, vocabularies of the tokenizers' sizes.
    Composing the cross pair is timed twice: with tokenizer objects it has never seen (the first composition
    in a process) and again with the same ones (calm keeps what it worked out about a tokenizer object)."""
    anchor_layers, anchor_width, augment_layers, augment_width, _ = PAIRS[pair]
    va, vg = len(anchor_tok), len(augment_tok)
    now = CLOCKS[common.clock]
    seconds, models = {}, {}
    for name, vocab, kwargs in (("same", va, {}),
                                ("cross", vg, {"tokenizer": anchor_tok, "augment_tokenizer": augment_tok})):
        anchor, augment = llama(anchor_layers, anchor_width, va, 0), llama(augment_layers, augment_width, vocab, 1)
        start = now()
        models[name] = calm.compose(anchor, augment, num_connections=connections, init="random", **kwargs).train()
        seconds[name] = now() - start
    if models["cross"].aligners[0] is None:
        raise SystemExit("cross_tokenizer.py: the two tokenizers are the same; pick two different ones")
    start = now()
    calm.compose(models["cross"].anchor, models["cross"].augments[0], num_connections=connections,
                 tokenizer=anchor_tok, augment_tokenizer=augment_tok)
    seconds["cross_again"] = now() - start
    return models["same"], models["cross"], seconds


def cross_step(model: calm.CALMForCausalLM, opt: torch.optim.Optimizer, batch: Batch, inputs: list,
               states: list | None = None) -> None:
    """One training step of a cross-tokenizer composition on a collated batch: the augment's token ids and
    alignment (`inputs`, from `model.align`) come with the batch, as a data collator builds them."""
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, labels=ids, augment_inputs=inputs, augment_states=states
          ).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def training_workloads(same, cross, same_opt, cross_opt, batch: Batch) -> dict[str, Callable]:
    inputs = cross.align(*batch)
    same_states = same.compute_augment_states(*batch)
    cross_states = cross.compute_augment_states(*batch, inputs)
    return {
        "same_step": lambda: composed_step(same, same_opt, batch),
        "cross_step": lambda: cross_step(cross, cross_opt, batch, inputs),
        "same_cached": lambda: composed_step(same, same_opt, batch, same_states),
        "cross_cached": lambda: cross_step(cross, cross_opt, batch, inputs, cross_states),
        "same_augment": lambda: same.compute_augment_states(*batch),
        "cross_augment": lambda: cross.compute_augment_states(*batch, inputs),
        "align": lambda: cross.align(*batch),  # the collator's work, once per batch
    }


def training(same, cross, batch: Batch, repeats: int) -> tuple[dict, dict]:
    same_opt, cross_opt = optimizer(same), optimizer(cross)
    warm = (batch[0][:1, :16], batch[1][:1, :16])
    for fn in training_workloads(same, cross, same_opt, cross_opt, warm).values():  # every code path once
        fn()
    times = rounds(training_workloads(same, cross, same_opt, cross_opt, batch), repeats, warmup=False)
    ratio = Ratios(times)
    inputs = cross.align(*batch)[0]
    tokens = batch[0].numel()
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "seconds": median,
        "anchor_tokens": tokens,
        "augment_tokens": int(inputs["attention_mask"].sum()),
        "augment_width": inputs["input_ids"].shape[1],
        "step_ratio": ratio("training/step_ratio", ["cross_step"], ["same_step"]),
        "cached_step_ratio": ratio("training/cached_step_ratio", ["cross_cached"], ["same_cached"]),
        "augment_ratio": ratio("training/augment_ratio", ["cross_augment"], ["same_augment"]),
        "inline_ratio": ratio("training/inline_ratio", ["cross_step", "align"], ["same_step"]),
        "align_share": ratio("training/align_share", ["align"], ["same_step"]),
        "align_ms_per_batch": 1000 * median["align"],
        "align_us_per_anchor_token": 1e6 * median["align"] / tokens,
    }
    return result, ratio.ranges


def zero_outputs(model: calm.CALMForCausalLM) -> None:
    """Zero every composition layer's output projection: the composition then adds exactly nothing (it still
    does all its work), so it decodes the anchor's own tokens."""
    with torch.no_grad():
        for layer in model.composition.modules():
            if isinstance(layer, CrossAttention):
                layer.o.weight.zero_()


class FollowText(LogitsProcessor):
    """Greedy decoding that writes `text` (1-D anchor ids, the prompt included): every score but the text's next
    token's is set to -inf. Random weights would otherwise decode repetitive junk (runs of one token without
    spaces, which the alignment reads as few long chunks), not the words of real text."""

    def __init__(self, text: torch.Tensor) -> None:
        self.text = text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.text[input_ids.shape[1]]] = 0.0
        return forced


def alignment_us_per_token(model: calm.CALMForCausalLM, sequence: torch.Tensor, windows: list[tuple[int, int]],
                           repeats: int = 3) -> dict[str, float]:
    """The alignment's own cost per anchor token in generation: the sequence fed one column at a time into a
    fresh alignment state, as each decoding step feeds it (the columns before the first window at once, as a
    prompt), in µs per token over each window (named by new tokens: columns after the first window's start);
    median of `repeats` passes."""
    mask, positions = torch.ones_like(sequence), torch.arange(sequence.shape[1])[None]
    first = windows[0][0]
    per_pass: dict[str, list[float]] = {f"{a - first}-{b - first}": [] for a, b in windows}
    for _ in range(repeats):
        state = AlignmentState(model.aligners[0])
        state.feed(sequence[:, :first], mask[:, :first], positions[:, :first], 0)
        for start, end in windows:
            begin = time.process_time()
            for column in range(start, end):
                state.feed(sequence[:, column:column + 1], mask[:, :column + 1], positions[:, column:column + 1],
                           column)
            per_pass[f"{start - first}-{end - first}"].append(1e6 * (time.process_time() - begin) / (end - start))
    return {window: statistics.median(t) for window, t in per_pass.items()}


def augment_calls(model: calm.CALMForCausalLM, fn: Callable) -> int:
    """How many times `fn` runs the (first) augment's forward."""
    calls = []
    handle = model.augments[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def generation(same, cross, text: torch.Tensor, prompt_tokens: int, lengths: list[int], repeats: int
               ) -> tuple[dict, dict]:
    """Cached greedy generation, batch 1: writing the sample text after a prompt of its first tokens, for each
    of `lengths` new tokens; and free-running (what the random anchor decodes on its own) for the longest."""
    zero_outputs(same)  # free-running, both then decode the anchor's own tokens
    zero_outputs(cross)
    same.eval()
    cross.eval()
    prompt = text[None, :prompt_tokens]
    mask, follow = torch.ones_like(prompt), LogitsProcessorList([FollowText(text)])
    longest = max(lengths)

    @torch.no_grad()
    def generate(model, n, free=False):
        return model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, logits_processor=None if free else follow)

    models = {"same": same, "cross": cross}
    for model in models.values():  # warm-up
        generate(model, 8)
        generate(model, 8, free=True)
    fns = {f"{name}_{n}": (lambda m=model, n=n: generate(m, n)) for n in lengths for name, model in models.items()}
    fns |= {f"{name}_free": (lambda m=model: generate(m, longest, free=True)) for name, model in models.items()}
    times = rounds(fns, repeats, warmup=False)
    ratio = Ratios(times)
    written = generate(cross, longest)
    free = {name: generate(model, longest, free=True) for name, model in models.items()}

    def new_augment_tokens(sequence: torch.Tensor) -> float:
        """Augment tokens per new anchor token: those the new tokens make final."""
        whole, before = (cross.align(t)[0]["attention_mask"].sum().item() for t in (sequence, prompt))
        return (whole - before) / longest

    def marginal(name: str, a: int, b: int) -> float:
        """Median over rounds of the extra ms per token from a to b new tokens (the prompt's cost cancels)."""
        pairs = zip(times[f"{name}_{a}"], times[f"{name}_{b}"])
        return statistics.median(1000 * (tb - ta) / (b - a) for ta, tb in pairs)

    steps = list(zip(lengths, lengths[1:]))
    p = prompt_tokens
    windows = [(p + a, p + b) for a, b in [(0, lengths[0]), *steps]] + [(p + longest, p + 8 * longest)]
    result = {
        "new_tokens": lengths, "prompt_tokens": p,
        "ms_per_token": {name: {str(n): 1000 * statistics.median(times[f"{name}_{n}"]) / n for n in lengths}
                         for name in models},
        "marginal_ms_per_token": {name: {f"{a}-{b}": marginal(name, a, b) for a, b in steps} for name in models},
        "per_token_ratio": ratio("generation/per_token_ratio", [f"cross_{longest}"], [f"same_{longest}"]),
        "ratio_by_length": {str(n): ratio(f"generation/ratio_{n}", [f"cross_{n}"], [f"same_{n}"]) for n in lengths},
        "augment_tokens_per_new_token": new_augment_tokens(written),
        "augment_calls": {name: augment_calls(model, lambda m=model: generate(m, longest))
                          for name, model in models.items()},
        "align_us_per_token": alignment_us_per_token(cross, text[None, :p + 8 * longest], windows),
        "free": {
            "new_tokens": longest,
            "ms_per_token": {name: 1000 * statistics.median(times[f"{name}_free"]) / longest for name in models},
            "per_token_ratio": ratio("generation/free_ratio", ["cross_free"], ["same_free"]),
            "same_tokens": bool(torch.equal(free["same"], free["cross"])),
            "augment_tokens_per_new_token": new_augment_tokens(free["cross"]),
            "augment_calls": augment_calls(cross, lambda: generate(cross, longest, free=True)),
            "text": cross.tokenizer.decode(free["cross"][0, p:])[:120],
        },
    }
    return result, ratio.ranges


def describe(pair: str, anchor: str, augment: str, vocab: tuple[int, int], shape: tuple[int, int]) -> str:
    anchor_layers, anchor_width, augment_layers, augment_width, _ = PAIRS[pair]
    return (f"anchor {anchor_layers}×{anchor_width} on {anchor} (vocab {vocab[0]}), augment "
            f"{augment_layers}×{augment_width} on {augment} (vocab {vocab[1]}); batch {shape[0]} × seq {shape[1]}")


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=5)
    p.add_argument("--tokenizers", default="smollm2+gemma", choices=PAIRINGS,
                   help="anchor+augment tokenizers (the same-tokenizer baseline puts both on the anchor's)")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="training batch (default: SHAPES)")
    p.add_argument("--seq", type=int, default=None, help="training sequence length in anchor tokens")
    p.add_argument("--connections", type=int, default=2, help="num_connections of both compositions")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--skip-generation", action="store_true")
    args = parse(p, argv)
    begin = time.perf_counter()

    anchor_name, augment_name = args.tokenizers.split("+")
    anchor_tok, augment_tok = load_tokenizer(anchor_name), load_tokenizer(augment_name)
    shape = (args.batch or SHAPES[args.pair][0], args.seq or SHAPES[args.pair][1])
    same, cross, compose_seconds = compositions(args.pair, anchor_tok, augment_tok, args.connections)
    vocab = (len(anchor_tok), len(augment_tok))
    result = {
        "key": args.pair if args.tokenizers == PAIRINGS[0] else f"{args.pair}, {args.tokenizers}",
        "machine": machine(), "pair": args.pair, "tokenizers": {"anchor": anchor_name, "augment": augment_name},
        "setting": describe(args.pair, anchor_name, augment_name, vocab, shape),
        "repeats": {"training": args.repeats, "generation": args.gen_repeats},
        "connections": cross.config.connections, "vocab": {"anchor": vocab[0], "augment": vocab[1]},
        "compose_seconds": compose_seconds,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    result["training"], ranges = training(same, cross, text_batch(anchor_tok, *shape), args.repeats)
    if not args.skip_generation:
        lengths = sorted(args.new_tokens)
        text = text_batch(anchor_tok, 1, args.prompt_tokens + 8 * max(lengths))[0][0]
        result["generation"], gen_ranges = generation(same, cross, text, args.prompt_tokens, lengths,
                                                      args.gen_repeats)
        ranges |= gen_ranges
    result["ranges"] = ranges
    result["seconds"] = time.perf_counter() - begin
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
