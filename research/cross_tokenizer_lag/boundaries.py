"""How often would Gemma read a non-canonical split if the completion were cut at SmolLM2's token boundaries?"""
import random

from calm.packaged import load_tokenizer
from calm.tasks import translation as task

a, g = load_tokenizer("smollm2-135m-instruct"), load_tokenizer("gemma-3-270m")
pairs = task.split(task.load_pairs("uk"), "validation")
random.Random(0).shuffle(pairs)
pairs = pairs[:200]
for side in ("english", "source"):
    same = words = atok = gtok = gsplit = 0
    for p in pairs:
        text = " " + (p.english if side == "english" else p.source)
        ids = a(text, add_special_tokens=False)["input_ids"]
        pieces = [a.decode([i]) for i in ids]
        canon = g(text, add_special_tokens=False)["input_ids"]
        # per anchor token: Gemma's reading of each token's text on its own (whole characters only)
        buf, split_ids = "", []
        for piece in pieces:
            buf += piece
            if "\ufffd" in buf:
                continue
            split_ids += g(buf, add_special_tokens=False)["input_ids"]
            buf = ""
        atok += len(ids)
        gtok += len(canon)
        gsplit += len(split_ids)
        for w in text.split():
            words += 1
            ww = " " + w
            wa = [a.decode([i]) for i in a(ww, add_special_tokens=False)["input_ids"]]
            b, sp = "", []
            for piece in wa:
                b += piece
                if "\ufffd" in b:
                    continue
                sp += g(b, add_special_tokens=False)["input_ids"]
                b = ""
            same += sp == g(ww, add_special_tokens=False)["input_ids"]
    print(f"{side}: anchor tokens {atok}, gemma canonical {gtok}, gemma cut at anchor boundaries {gsplit}; "
          f"words read as Gemma reads them whole: {same}/{words} = {same/words:.1%}")
