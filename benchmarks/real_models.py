"""Real models (BENCHMARKS.md §9): the cost of a real cross-tokenizer composition against its parts.

    .venv/bin/python benchmarks/real_models.py [--repeats 7] [--gen-repeats 3] [--batch 8] [--seq 128]
        [--new-tokens 64] [--prompt-tokens 32] [--no-write]

The composition of `calm reproduce translation` (src/calm/experiments/translation.py): anchor m_B =
SmolLM2-135M-Instruct, augment m_A = Gemma-3 270M (different tokenizers: the augment reads the text through its
own, `calm.alignment`), the connections of `TranslationSpec`, loaded with `calm.packaged`. Inputs are real text:
Ukrainian→English Bible examples of the training split (`calm.tasks.translation`, prompt + completion).

- Training: batch of verses whose example is at least `--seq` anchor tokens long, cut to `--seq` (no padding).
  One step = forward with labels + backward + AdamW on the composition parameters, `augment_inputs` from
  `model.align(...)` made outside the timed step, as a data collator makes them (that alignment is timed on its
  own). Parts, as in §1: the anchor's forward + backward from the first connected anchor block with activation
  gradients only, (a), or an ordinary fine-tuning forward + backward, (b); the augment's forward truncated after
  its deepest tapped block, over its own tokens; the new cross-attention layers alone (fed stand-in anchor states,
  the real augment states and the cross-tokenizer mask).
- Generation: greedy, cached, batch 1, after a translation prompt of about `--prompt-tokens` anchor tokens. The
  composition and the anchor alone are forced to write the example's text (`FollowText`), so that the alignment
  reads real words; the augment alone (the full Gemma, final norm and LM head over its 262144-token vocabulary
  included) generates as many tokens of the same text through its own tokenizer, with its own cache; the augment
  truncated as the composition runs it (no LM head) is timed by a plain cached loop over those tokens.

All workloads are timed in alternation in one process (`common.rounds`); figures are medians of per-round ratios.
Run alone, the result is merged into benchmarks/results.json under "real_models" (`--no-write`: printed only).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import statistics
import time
from collections.abc import Callable

import common
import torch
from common import (
    CLOCKS,
    Batch,
    Ratios,
    anchor_backward_from,
    anchor_finetune_backward,
    first_anchor_block,
    machine,
    optimizer,
    parse,
    parser,
    rounds,
)
from cross_tokenizer import FollowText, augment_calls, cross_step
from transformers import DynamicCache, LogitsProcessorList

import calm
from calm.blocks import decoder_blocks
from calm.experiments.translation import TranslationSpec
from calm.packaged import load_model, load_tokenizer
from calm.tasks import translation as task

KEY = "smollm2+gemma"


def examples(language: str = "uk") -> list[str]:
    """The training split's examples, prompt + completion, in canonical order."""
    return [e["prompt"] + e["completion"] for p in task.split(task.load_pairs(language), "train")
            for e in [task.example(p, language)]]


def text_batch(tokenizer, texts: list[str], batch: int, seq: int) -> Batch:
    """`batch` examples of at least `seq` anchor tokens, evenly spaced over the split, cut to `seq`."""
    long = [ids[:seq] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(ids) >= seq]
    ids = torch.tensor([long[i * len(long) // batch] for i in range(batch)])
    return ids, torch.ones_like(ids)


def cross_layers_step(model: calm.CALMForCausalLM, opt: torch.optim.Optimizer, states: list, inputs: dict,
                      hidden: torch.Tensor) -> None:
    """`common.composition_layers_step` on the cross-tokenizer path: keys over the augment's tokens at their key
    positions, each anchor position seeing the augment tokens final by it (the mask `model.forward` builds)."""
    first, length = first_anchor_block(model), hidden.shape[1]
    columns = torch.arange(length)
    mask = inputs["attention_mask"].bool()[:, None, None, :] & (
        inputs["visible_from"][:, None, None, :] <= columns[None, None, :, None])
    updates = []
    for j, (a, b) in enumerate(model.config.connections[0]):
        layer = model.composition[0][j]
        query = hidden if b == first else hidden.detach().requires_grad_()
        keys, values = layer.keys_values(states[0][a], inputs["key_positions"])
        updates.append(layer(query, keys, values, mask, columns[None]))
    torch.stack(updates).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def training_workloads(model, opt, batch: Batch) -> dict[str, Callable]:
    anchor, first = model.anchor, first_anchor_block(model)
    inputs = model.align(*batch)
    states = model.compute_augment_states(*batch, inputs)
    hidden = torch.randn(*batch[0].shape, anchor.config.hidden_size)
    return {  # workloads compared with each other run next to each other
        "anchor_activations": lambda: anchor_backward_from(anchor, first, batch),
        "augment_truncated": lambda: model.compute_augment_states(*batch, inputs),
        "composed": lambda: cross_step(model, opt, batch, inputs),
        "composition_layers": lambda: cross_layers_step(model, opt, states, inputs[0], hidden),
        "anchor_finetune": lambda: anchor_finetune_backward(anchor, batch),
        "align": lambda: model.align(*batch),  # the collator's work, once per batch
    }


def training(model: calm.CALMForCausalLM, batch: Batch, repeats: int) -> tuple[dict, dict]:
    opt = optimizer(model)
    for fn in training_workloads(model, opt, (batch[0][:1, :16], batch[1][:1, :16])).values():  # warm-up
        fn()
    times = rounds(training_workloads(model, opt, batch), repeats, warmup=False)
    ratio = Ratios(times)
    acts, trunc, layers = ["anchor_activations"], ["augment_truncated"], ["composition_layers"]
    inputs = model.align(*batch)[0]
    return {
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "anchor_tokens": batch[0].numel(), "augment_tokens": int(inputs["attention_mask"].sum()),
        "step_over_parts": ratio("training/step_over_parts", ["composed"], acts + trunc),
        "step_over_finetune_parts": ratio("training/step_over_finetune_parts", ["composed"],
                                          ["anchor_finetune", *trunc]),
        "step_over_all_parts": ratio("training/step_over_all_parts", ["composed"], acts + trunc + layers),
        "composition_layers_share": ratio("training/composition_layers_share", layers, acts + trunc),
        "align_share": ratio("training/align_share", ["align"], ["composed"]),
    }, ratio.ranges


class _Stop(Exception):
    pass


@torch.no_grad()
def truncated_decode(augment, ids: torch.Tensor, prompt: int, block: int) -> None:
    """The augment's cached decoding as the composition runs it: stopped after `block` (no final norm, no LM
    head), the prompt at once, then one token at a time."""
    def stop(module, args, output):
        raise _Stop

    cache = DynamicCache(config=augment.config)
    handle = decoder_blocks(augment)[block].register_forward_hook(stop)
    try:
        for start, end in [(0, prompt), *((t, t + 1) for t in range(prompt, ids.shape[1]))]:
            with contextlib.suppress(_Stop):
                augment(input_ids=ids[:, start:end], cache=cache, use_cache=True)
    finally:
        handle.remove()


def generation(model: calm.CALMForCausalLM, augment_tok, prompt_tokens: int, n: int, repeats: int
               ) -> tuple[dict, dict]:
    """Cached greedy generation, batch 1: a translation prompt whose length is the nearest to `prompt_tokens`,
    followed by its English and the next examples, `n` new tokens."""
    model.eval()
    anchor, augment, anchor_tok = model.anchor, model.augments[0], model.tokenizer
    pairs = task.split(task.load_pairs("uk"), "train")
    lengths = [len(anchor_tok(task.prompt(p, "uk"), add_special_tokens=False)["input_ids"]) for p in pairs]
    i = min(range(len(pairs)), key=lambda i: abs(lengths[i] - prompt_tokens))
    prompt_text = task.prompt(pairs[i], "uk")
    text = "\n\n".join(e["prompt"] + e["completion"] for e in (task.example(p, "uk") for p in pairs[i:i + 8]))
    p = {"anchor": lengths[i], "augment": len(augment_tok(prompt_text)["input_ids"])}
    whole = {"anchor": anchor_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"],
             "augment": augment_tok(text, return_tensors="pt")["input_ids"]}  # Gemma's BOS, as the alignment

    @torch.no_grad()
    def generate(m, who: str):
        prompt = whole[who][:, :p[who]]
        return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0,
                          logits_processor=LogitsProcessorList([FollowText(whole[who][0])]))

    block = max(a for a, _ in model.config.connections[0])
    fns = {"composed": lambda: generate(model, "anchor"), "anchor": lambda: generate(anchor, "anchor"),
           "augment": lambda: generate(augment, "augment"),
           "augment_truncated": lambda: truncated_decode(augment, whole["augment"][:, :p["augment"] + n],
                                                         p["augment"], block)}
    times = rounds(fns, repeats)
    ratio = Ratios(times)
    written = generate(model, "anchor")
    augment_new = (model.align(written)[0]["attention_mask"].sum()
                   - model.align(whole["anchor"][:, :p["anchor"]])[0]["attention_mask"].sum()).item()
    return {
        "prompt_tokens": p, "new_tokens": n,
        "ms_per_token": {name: 1000 * statistics.median(t) / n for name, t in times.items()},
        "composed_over_anchor_plus_augment": ratio("generation/composed_over_anchor_plus_augment", ["composed"],
                                                   ["anchor", "augment"]),
        "composed_over_anchor": ratio("generation/composed_over_anchor", ["composed"], ["anchor"]),
        "composed_over_anchor_plus_truncated": ratio("generation/composed_over_anchor_plus_truncated",
                                                     ["composed"], ["anchor", "augment_truncated"]),
        "augment_tokens_per_new_token": augment_new / n,
        "augment_calls": augment_calls(model, lambda: generate(model, "anchor")),
        "text": anchor_tok.decode(written[0, p["anchor"]:])[:120],
    }, ratio.ranges


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=7)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="training sequence length in anchor tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--no-write", action="store_true", help="run alone: do not write benchmarks/results.json")
    args = parse(p, argv)
    begin, now = time.perf_counter(), CLOCKS[common.clock]

    spec = TranslationSpec()
    start = now()
    anchor, augment = load_model(spec.anchor), load_model(spec.augment)
    anchor_tok, augment_tok = load_tokenizer(spec.anchor), load_tokenizer(spec.augment)
    loaded = now() - start
    model = calm.compose(anchor, augment, connections=spec.connections, tokenizer=anchor_tok,
                         augment_tokenizer=augment_tok).train()
    result = {
        "key": KEY, "machine": machine(), "anchor": spec.anchor, "augment": spec.augment,
        "setting": f"{spec.anchor} ({anchor.config.num_hidden_layers} blocks × {anchor.config.hidden_size}, vocab "
                   f"{len(anchor_tok)}) + {spec.augment} ({augment.config.num_hidden_layers} × "
                   f"{augment.config.hidden_size}, vocab {len(augment_tok)}); batch {args.batch} × seq {args.seq}",
        "repeats": {"training": args.repeats, "generation": args.gen_repeats},
        "connections": model.config.connections, "first_anchor_block": first_anchor_block(model),
        "load_seconds": loaded, "compose_seconds": now() - start - loaded,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    batch = text_batch(anchor_tok, examples(), args.batch, args.seq)
    result["training"], ranges = training(model, batch, args.repeats)
    if not args.skip_generation:
        result["generation"], gen_ranges = generation(model, augment_tok, args.prompt_tokens, args.new_tokens,
                                                      args.gen_repeats)
        ranges |= gen_ranges
    result["ranges"] = ranges
    result["seconds"] = time.perf_counter() - begin
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def save(result: dict) -> None:
    """Merge into benchmarks/results.json as run_all.py would (`run_all.py --only real_models` also re-renders
    BENCHMARKS.md)."""
    from report import HERE

    results = json.loads((HERE / "results.json").read_text())
    results.setdefault("real_models", {})[KEY] = result
    results.setdefault("seconds", {})[f"real_models/{KEY}"] = round(result["seconds"], 1)
    for part, count in result["repeats"].items():
        results.setdefault("repeats", {})[f"real_models/{KEY} ({part})"] = count
    (HERE / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import sys

    out = main()
    if "--no-write" not in sys.argv:
        save(out)
