"""Shared helpers (same prompt / decoding / NLL as probe.py) for alt_probe.py."""
import sys
import time

import torch

sys.path.insert(0, "/work/main/tests")
import sacrebleu
from tokenizer_support import real_tokenizer
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from calm.packaged import from_pretrained_kwargs


def fewshot(src, shots, lang="Source"):
    return "".join(f"{lang}: {a}\nEnglish: {b}\n\n" for a, b in shots) + f"{lang}: {src}\nEnglish:"


class Model:
    def __init__(self, name):
        self.tok = real_tokenizer(name)
        self.model = AutoModelForCausalLM.from_pretrained(**from_pretrained_kwargs(name), dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompt, max_new=60):
        tok = self.tok
        ids = torch.tensor([tok(prompt)["input_ids"]])
        n = ids.shape[1]

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return "\n" in tok.decode(input_ids[0, n:], skip_special_tokens=True).lstrip("\n ")

        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                  stopping_criteria=StoppingCriteriaList([Stop()]),
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, n:], skip_special_tokens=True).strip().split("\n")[0].strip()

    @torch.no_grad()
    def ref_nll(self, prompt, ref):
        p = self.tok(prompt)["input_ids"]
        r = self.tok(" " + ref, add_special_tokens=False)["input_ids"]
        logits = self.model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="sum").item(), len(r)

    def nll_right_wrong(self, pairs, shots, lang):
        wrong = pairs[1:] + pairs[:1]
        a = b = n = 0
        for (s, e), (w, _) in zip(pairs, wrong):
            x, k = self.ref_nll(fewshot(s, shots, lang), e)
            y, _ = self.ref_nll(fewshot(w, shots, lang), e)
            a += x
            b += y
            n += k
        return {"nll_right_src": round(a / n, 3), "nll_wrong_src": round(b / n, 3)}

    def gen_eval(self, pairs, shots, lang):
        t = time.time()
        hyps = [self.generate(fewshot(s, shots, lang)) for s, _ in pairs]
        refs = [e for _, e in pairs]
        return {"chrF": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
                "BLEU": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2), "n_gen": len(pairs),
                "gen_s": round(time.time() - t, 1),
                "examples": [{"src": s, "ref": e, "hyp": h} for (s, e), h in zip(pairs, hyps)]}
