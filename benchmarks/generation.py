"""Generation cost (BENCHMARKS.md §4): per-token latency of the composed model against the anchor and the
augment each generating with its own cache, and cached against uncached composed generation.

    .venv/bin/python benchmarks/generation.py [--pair small] [--new-tokens 256]
"""

from __future__ import annotations

import json
import statistics

import torch
from common import Ratios, interleaved, machine, pair, parse, parser, rounds

import calm


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    args = parse(p, argv)

    anchor, augment = pair(args.pair)
    model = calm.compose(anchor, augment, every=2, init="random")  # the augment is tapped up to its last block
    prompt = torch.randint(1, anchor.config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    common = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def run(m, use_cache=True):
        return lambda: m.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=use_cache, **common)

    times = rounds({"composed": run(model), "anchor": run(anchor), "augment": run(augment)}, args.repeats)
    t, ratio = {k: statistics.median(v) for k, v in times.items()}, Ratios(times)
    # Uncached generation is slow (quadratic): once each, after the warm-up above. The anchor's own speed-up
    # shows how much of the composed one is set by the machine and the model size rather than the composition.
    uncached = interleaved({"composed_uncached": run(model, use_cache=False), "composed": run(model),
                            "anchor_uncached": run(anchor, use_cache=False), "anchor": run(anchor)}, 1,
                           warmup=False)
    result = {
        "machine": machine(), "pair": args.pair, "new_tokens": n, "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats, "connections": model.config.connections,
        "ms_per_token": {k: 1000 * v / n for k, v in t.items()},
        "composed_over_anchor_plus_augment": ratio("composed_over_anchor_plus_augment", ["composed"],
                                                   ["anchor", "augment"]),
        "composed_over_anchor": ratio("composed_over_anchor", ["composed"], ["anchor"]),
        "cached_speedup": uncached["composed_uncached"] / uncached["composed"],
        "anchor_cached_speedup": uncached["anchor_uncached"] / uncached["anchor"],
        "ranges": ratio.ranges,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
