"""How much does the cross-tokenizer lag cost the translation composition? Real vs random m_A, with and without it.

An anchor position sees an augment token only once the chunk (word) holding it is known to be complete, i.e.
when the next chunk's first character arrives (docs/cross-tokenizer.md). So m_A's state that predicts the next
English word reaches the anchor one word late. This probe trains the composition with an *oracle* alignment
that shows each augment token from the anchor position that brought its last character. That leaks a little
(that the word ended there, and how m_A split a word still being read), which is why the random-m_A control
runs with the same oracle: the gap between real and random m_A, under each alignment, is what m_A adds.

    .venv/bin/python research/cross_tokenizer_lag/probe.py real|random oracle|lagged OUT_DIR [STEPS]
"""

import json
import sys
from pathlib import Path

import torch

from calm.alignment import TokenizerAligner
from calm.experiments import translation as exp

which, alignment, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 150

if alignment == "oracle":
    lagged_align = TokenizerAligner.align

    def oracle_align(self, input_ids, attention_mask=None, position_ids=None, prompt_lengths=None):
        out = lagged_align(self, input_ids, attention_mask, position_ids, prompt_lengths)
        # Columns of a left-padded row start after its padding; key positions count its real tokens.
        offset = (torch.zeros(input_ids.shape[0], dtype=torch.long) if attention_mask is None
                  else (attention_mask.long().cumsum(-1) == 0).sum(-1))
        real = out["attention_mask"].bool()
        early = torch.where(real, out["key_positions"] + offset[:, None], out["visible_from"])
        out["visible_from"] = torch.minimum(out["visible_from"], early)
        return out

    TokenizerAligner.align = oracle_align

torch.set_num_threads(1)
spec = exp.TranslationSpec(eval_split="validation", steps=steps, lr=3e-3, augment_norm="block")
bases = exp.load_bases(spec)
data = exp.make_data(spec, bases.tokenizer)
torch.manual_seed(0)  # as `calm reproduce translation` builds its CALM rows, so the lagged runs match them
model = exp.compose(bases, spec, augment=bases.augment if which == "real" else exp.random_augment(bases.augment, 0))
run = exp.train_on_d_c(model, bases.tokenizer, data, spec, out / f"{which}_{alignment}", spec.lr, seed=0)
losses = [r["loss"] for r in map(json.loads, (out / f"{which}_{alignment}" / "metrics.jsonl").open()) if "loss" in r]
print(which, alignment, run, "mean loss per 20 steps:",
      [round(sum(losses[i:i + 4]) / len(losses[i:i + 4]), 3) for i in range(0, len(losses), 4)])
