"""Is the composition's output too small for the anchor's residual stream? Train with its update scaled by a constant.

SmolLM2-135M's residual stream has a median RMS of 7-17 per dimension at the connected blocks (14-24), while a
cross-attention update starts at zero and its output projection moves by about the learning rate per step
(Adam). Scaling the update by SCALE is, for Adam, the same as giving the output projection a SCALE-times
larger learning rate while the other layers keep theirs.

    .venv/bin/python research/composition_scale/probe.py real|random SCALE OUT_DIR [STEPS]
"""

import json
import sys
from pathlib import Path

import torch

from calm.experiments import translation as exp
from calm.layers import CrossAttention

which, scale, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 150
unscaled = CrossAttention.forward
CrossAttention.forward = lambda self, *args, **kwargs: scale * unscaled(self, *args, **kwargs)

torch.set_num_threads(1)
spec = exp.TranslationSpec(eval_split="validation", steps=steps, lr=3e-3, augment_norm="block")
bases = exp.load_bases(spec)
data = exp.make_data(spec, bases.tokenizer)
torch.manual_seed(0)  # as `calm reproduce translation` builds its CALM rows
model = exp.compose(bases, spec, augment=bases.augment if which == "real" else exp.random_augment(bases.augment, 0))
name = f"{which}_x{scale:g}"
run = exp.train_on_d_c(model, bases.tokenizer, data, spec, out / name, spec.lr, seed=0)
losses = [r["loss"] for r in map(json.loads, (out / name / "metrics.jsonl").open()) if "loss" in r]
print(which, scale, run, "mean loss per 20 steps:",
      [round(sum(losses[i:i + 4]) / len(losses[i:i + 4]), 3) for i in range(0, len(losses), 4)])
