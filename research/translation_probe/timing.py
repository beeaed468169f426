"""CPU timing. Usage: .venv/bin/python timing.py THREADS  -> timing_<THREADS>t.json
SmolLM2-135M: forward+backward, batch 8x128 (all params require grad, i.e. an upper bound on CALM's anchor cost;
also with params frozen and grad only w.r.t. input embeddings, closer to CALM where bases are frozen).
Gemma-3 270M: no-grad forward 8x96, full 18 blocks and truncated to its first 12.
Greedy generation ms/token (batch 1, KV cache, 16-token prompt, 64 new tokens) for both."""
import json
import sys
import time

import torch

THREADS = int(sys.argv[1])
torch.set_num_threads(THREADS)
from transformers import AutoModelForCausalLM  # noqa: E402 (after the thread count)

from calm.packaged import from_pretrained_kwargs  # noqa: E402

res = {"threads": THREADS}


def best(f, reps=3):
    f()  # warmup
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return round(min(ts), 3), round(sum(ts) / len(ts), 3)


def load(name):
    return AutoModelForCausalLM.from_pretrained(**from_pretrained_kwargs(name), dtype=torch.float32)


g = torch.Generator().manual_seed(0)
sm = load("smollm2-135m-instruct").train()
ids = torch.randint(100, 40000, (8, 128), generator=g)


def fb_full():
    sm.zero_grad(set_to_none=True)
    sm(input_ids=ids, labels=ids).loss.backward()


res["smollm2_fwd_bwd_8x128_all_params_s"] = best(fb_full)
for p in sm.parameters():
    p.requires_grad_(False)


def fb_frozen():
    emb = sm.get_input_embeddings()(ids).detach().requires_grad_(True)
    sm(inputs_embeds=emb, labels=ids).loss.backward()


res["smollm2_fwd_bwd_8x128_frozen_params_s"] = best(fb_frozen)
with torch.no_grad():
    res["smollm2_fwd_nograd_8x128_s"] = best(lambda: sm(input_ids=ids))
sm.eval()


def gen_ms_per_token(model, prompt_len=16, new=64):
    p = torch.randint(100, 5000, (1, prompt_len), generator=g)
    kw = dict(attention_mask=torch.ones_like(p), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(p, max_new_tokens=4, min_new_tokens=4, **kw)
        t = time.perf_counter()
        model.generate(p, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(p, max_new_tokens=new, min_new_tokens=new, **kw)
        tn = time.perf_counter() - t
    return round((tn - t1) / (new - 1) * 1000, 1)


res["smollm2_gen_ms_per_token"] = gen_ms_per_token(sm)
sm = None  # frees SmolLM2 before Gemma loads
print(res, flush=True)

ge = load("gemma-3-270m").eval()
gids = torch.randint(100, 40000, (8, 96), generator=g)
with torch.no_grad():
    res["gemma_fwd_nograd_8x96_18blocks_s"] = best(lambda: ge(input_ids=gids))
    # hidden states of the first 12 blocks only: what CALM needs when its deepest augment connection is block 12
    # (no LM head, which is 262k x 640 = 168M MACs/token)
    inner = ge.model
    full_layers = inner.layers
    inner.layers = full_layers[:12]
    inner.config.num_hidden_layers = 12
    res["gemma_fwd_nograd_8x96_12blocks_nohead_s"] = best(lambda: inner(input_ids=gids))
    inner.layers = full_layers
    inner.config.num_hidden_layers = 18
    res["gemma_fwd_nograd_8x96_18blocks_nohead_s"] = best(lambda: inner(input_ids=gids))
res["gemma_gen_ms_per_token"] = gen_ms_per_token(ge)
print(res, flush=True)
with open(f"timing_{THREADS}t.json", "w") as f:
    json.dump(res, f, indent=1)
