"""Generation cost: composed vs its parts, and cached vs uncached (issue 3 / BENCHMARKS.md §4).

    .venv/bin/python benchmarks/generation.py [--pair small] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import interleaved, machine, pair

import calm


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="small", choices=["small", "tiny"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    anchor, augment = pair(args.pair)
    model = calm.compose(anchor, augment, every=2, init="paper")  # the augment is tapped up to its last block
    prompt = torch.randint(1, anchor.config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    common = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def run(m, use_cache=True):
        return lambda: m.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=use_cache, **common)

    t = interleaved({"composed": run(model), "anchor": run(anchor), "augment": run(augment)}, args.repeats)
    uncached = interleaved({"composed_uncached": run(model, use_cache=False), "composed": run(model)}, 1)
    parts = t["anchor"] + t["augment"]
    result = {
        "machine": machine(), "pair": args.pair, "new_tokens": n, "connections": model.config.connections,
        "ms_per_token": {k: 1000 * v / n for k, v in t.items()},
        "composed_over_anchor_plus_augment": t["composed"] / parts,
        "composed_over_anchor": t["composed"] / t["anchor"],
        "cached_speedup": uncached["composed_uncached"] / uncached["composed"],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
