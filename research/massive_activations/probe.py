"""Does m_A's own next-block input norm let CALM read Gemma-3? Real vs random m_A, 60 steps on D_C.

Gemma-3's residual stream is dominated by a few massive dimensions (86-97% of the squared norm at the tapped
blocks). calm's `augment_norm` (unit RMS, no weights) keeps them. Here each connection's `augment_norm` is replaced
by a copy of m_A's `layers[a + 1].input_layernorm` (Gemma3RMSNorm with its learned weights), i.e. the state as m_A's
next block reads it. A random m_A gets its own (untrained: plain RMS) norms.

    .venv/bin/python research/massive_activations/probe.py real|random OUT_DIR
"""

import copy
import json
import sys
from pathlib import Path

import torch

from calm.experiments import translation as exp

which, out = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(1)
spec = exp.TranslationSpec(eval_split="validation", steps=60, lr=3e-3)
bases = exp.load_bases(spec)
data = exp.make_data(spec, bases.tokenizer)
augment = bases.augment if which == "real" else exp.random_augment(bases.augment, 0)
torch.manual_seed(0)
model = exp.compose(bases, spec, augment=augment)
for (a, _), layer in zip(spec.connections, model.composition[0]):
    norm = copy.deepcopy(augment.model.layers[a + 1].input_layernorm).requires_grad_(False)
    layer.augment_norm = norm
    w = norm.weight.float()
    print(f"m_A block {a + 1} input_layernorm: 1+w min {1 + w.min():.3f} median {(1 + w).median():.3f} "
          f"max {1 + w.max():.3f}", flush=True)
run = exp.train_on_d_c(model, bases.tokenizer, data, spec, out / which, spec.lr, seed=0)
losses = [r["loss"] for r in map(json.loads, (out / which / "metrics.jsonl").open()) if "loss" in r]
print(which, run, "mean loss per 20 steps:", [round(sum(losses[i:i + 4]) / 4, 3) for i in range(0, len(losses), 4)])
