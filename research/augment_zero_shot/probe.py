"""How well does m_A translate from the prompt the composition gives it?

Inside CALM, m_A reads the trained rows' zero-shot prompt ("Ukrainian: <verse>\\nEnglish:"), not the 3-shot
prompt of the "m_A, few-shot" row. This scores m_A (and m_B) both ways on the first N validation verses.

    python research/augment_zero_shot/probe.py --verses 100 --out research/augment_zero_shot/probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calm.experiments import translation as tr
from calm.tasks import translation as task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verses", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = tr.TranslationSpec(eval_split="validation")
    bases = tr.load_bases(spec)
    data = tr.make_data(spec, bases.tokenizer)
    verses = data.eval[: args.verses]
    references = [p.english for p in verses]
    prompts = {"zero-shot": [task.prompt(p, spec.language) for p in verses],
               "3-shot": [task.few_shot_prompt(p, data.shots, spec.language) for p in verses]}
    models = {"m_A": (bases.augment, bases.augment_tokenizer), "m_B": (bases.anchor, bases.tokenizer)}
    report = {"verses": len(verses), "split": "validation", "rows": {}}
    for model_name, (model, tokenizer) in models.items():
        for prompt_name, inputs in prompts.items():
            start = time.perf_counter()
            hypotheses = tr.translate(model, tokenizer, inputs, spec)
            row = f"{model_name}, {prompt_name}"
            report["rows"][row] = {**tr.scores(hypotheses, references),
                                   "seconds": round(time.perf_counter() - start, 1),
                                   "examples": hypotheses[:3]}
            print(row, report["rows"][row], flush=True)
    report["references"] = references[:3]
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
