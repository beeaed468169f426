"""Zero-/few-shot Japanese->English probe of the anchor (SmolLM2-135M-Instruct) and augment (Gemma-3 270M base).
Usage: .venv/bin/python probe.py smollm2-135m-instruct|gemma-3-270m   -> probe_<name>.json
Greedy, max 60 new tokens, stop at the first newline. Also a teacher-forced check: mean NLL/token of the reference
English given the few-shot prompt with the right Japanese vs with a wrong (another verse's) Japanese."""
import json
import random
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, "/work/main/tests")
import sacrebleu  # noqa: E402 (after the thread count and the path)
from data import load_pairs  # noqa: E402 (after the thread count and the path)
from tokenizer_support import real_tokenizer  # noqa: E402 (after the thread count and the path)
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList  # noqa: E402 (after the thread count and the path)

from calm.packaged import from_pretrained_kwargs  # noqa: E402 (after the thread count and the path)

NAME = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 40
pairs, _ = load_pairs()
key = {(p["book"], p["chap"], p["verse"]): p for p in pairs}
SHOTS = [key[("Mark", 1, v)] for v in (6, 12, 18)]  # from the proposed train split
john = [p for p in pairs if p["book"] == "John" and len(p["en"]) <= 200]
rng = random.Random(0)
VAL = rng.sample(john, N)
WRONG = VAL[1:] + VAL[:1]  # each query's Japanese swapped for the next one's (for the NLL control)

# short modern Japanese written for this probe (first 5 are modern renderings of John verses in VAL-style)
MODERN = [
    ("初めに言葉があった。言葉は神と共にあり、言葉は神であった。", "In the beginning was the Word, and the Word was with God, and the Word was God."),  # noqa: E501
    ("光は闇の中で輝いている。闇は光に勝たなかった。", "The light shines in the darkness, and the darkness has not overcome it."),  # noqa: E501
    ("イエスは涙を流した。", "Jesus wept."),
    ("神はその独り子を与えるほど、世を愛した。", "God so loved the world that he gave his only Son."),
    ("わたしは道であり、真理であり、命である。", "I am the way, the truth, and the life."),
    ("私は毎朝コーヒーを飲みます。", "I drink coffee every morning."),
    ("今日はとても暑いです。", "It is very hot today."),
    ("駅はどこですか。", "Where is the station?"),
    ("彼は昨日東京に行きました。", "He went to Tokyo yesterday."),
    ("この本はとても面白いです。", "This book is very interesting."),
    ("私の母は学校の先生です。", "My mother is a school teacher."),
    ("明日は雨が降るでしょう。", "It will probably rain tomorrow."),
    ("猫が机の上で寝ています。", "A cat is sleeping on the desk."),
]
MODERN_SHOTS = [("私は学生です。", "I am a student."), ("空は青いです。", "The sky is blue."),
                ("彼女は毎日公園を走ります。", "She runs in the park every day.")]

tok = real_tokenizer(NAME)
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(**from_pretrained_kwargs(NAME), dtype=torch.float32).eval()
load_s = time.time() - t0


def fewshot(ja, shots):
    return "".join(f"Japanese: {a}\nEnglish: {b}\n\n" for a, b in shots) + f"Japanese: {ja}\nEnglish:"


def chat(ja):
    request = "Translate this Japanese text into English. Reply with the translation only."
    msgs = [{"role": "user", "content": f"{request}\n\n{ja}"}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode(text):
    # Gemma needs its <bos>; SmolLM2's tokenizer adds nothing (its chat template carries its own markers)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    return torch.tensor([ids])


class StopAtNewline(StoppingCriteria):
    def __init__(self, n):
        self.n = n

    def __call__(self, input_ids, scores, **kw):
        return "\n" in tok.decode(input_ids[0, self.n:], skip_special_tokens=True).lstrip("\n ")


@torch.no_grad()
def generate(prompt):
    ids = encode(prompt)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([StopAtNewline(ids.shape[1])]),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()
    return text, len(new)


@torch.no_grad()
def ref_nll(prompt, ref):
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(" " + ref, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    logits = model(ids).logits[0, len(p) - 1:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="sum").item(), len(r)


def run(name, prompts, refs, srcs):
    hyps, ntok, t = [], 0, time.time()
    for pr in prompts:
        h, n = generate(pr)
        hyps.append(h)
        ntok += n
    dt = time.time() - t
    res = {"chrF": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
           "BLEU": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
           "gen_s": round(dt, 1), "new_tokens": ntok,
           "examples": [{"ja": s, "ref": r, "hyp": h} for s, r, h in zip(srcs, refs, hyps)]}
    print(name, {k: v for k, v in res.items() if k != "examples"}, flush=True)
    for e in res["examples"][:3]:
        print("   ", e["hyp"], "||", e["ref"], flush=True)
    return res


results = {"model": NAME, "load_s": round(load_s, 1), "val": [f"John {p['chap']}:{p['verse']}" for p in VAL]}
shots = [(s["ja"], s["en"]) for s in SHOTS]
refs, srcs = [p["en"] for p in VAL], [p["ja"] for p in VAL]
results["bible_fewshot"] = run("bible_fewshot", [fewshot(s, shots) for s in srcs], refs, srcs)
if "smollm2" in NAME:
    results["bible_chat0"] = run("bible_chat0", [chat(s) for s in srcs], refs, srcs)
mj, me = [a for a, _ in MODERN], [b for _, b in MODERN]
results["modern_fewshot"] = run("modern_fewshot", [fewshot(s, MODERN_SHOTS) for s in mj], me, mj)
if "smollm2" in NAME:
    results["modern_chat0"] = run("modern_chat0", [chat(s) for s in mj], me, mj)
# teacher-forced NLL of the reference with the right vs a wrong Japanese source (same few-shot prompt)
nr = nw = n = 0
for p, w in zip(VAL, WRONG):
    a, k = ref_nll(fewshot(p["ja"], shots), p["en"])
    b, _ = ref_nll(fewshot(w["ja"], shots), p["en"])
    nr += a
    nw += b
    n += k
results["nll_right_src"] = round(nr / n, 3)
results["nll_wrong_src"] = round(nw / n, 3)
print("NLL/token of reference: right source", results["nll_right_src"], "wrong source", results["nll_wrong_src"])
with open(f"probe_{NAME}.json", "w") as f:
    json.dump(results, f, indent=1, ensure_ascii=False)
