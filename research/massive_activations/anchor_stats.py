"""The anchor's side: how large is SmolLM2-135M's residual stream at the blocks the translation composition feeds?

Prints, after m_B blocks 14, 19 and 24 on one D_C-style example, the share of each token's squared norm held by
its 3 largest dimensions (the first token apart: it is the attention sink), the largest |h| and the median RMS.

    .venv/bin/python research/massive_activations/anchor_stats.py
"""

import torch

from calm.packaged import load_model, load_tokenizer

torch.set_num_threads(1)
model, tokenizer = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
text = ("Ukrainian: Споконвіку було Слово, а Слово в Бога було.\n"
        "English: In the beginning was the Word, and the Word was with God.")
with torch.no_grad():
    hidden = model(tokenizer(text, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states
for block in (14, 19, 24):
    h = hidden[block + 1][0]  # after block `block`
    squared = h.pow(2)
    share = squared.topk(3, dim=-1).values.sum(-1) / squared.sum(-1)
    print(f"after block {block}: top-3 share first token {share[0]:.2f}, others mean {share[1:].mean():.2f}; "
          f"max |h| {h.abs().max():.0f}; median RMS (others) {h.pow(2).mean(-1).sqrt()[1:].median():.2f}")
