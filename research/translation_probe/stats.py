"""Data stats: per-book verse counts, char and token lengths. Writes stats.json."""
import collections
import json
import statistics as st
import sys

sys.path.insert(0, "/work/main/tests")
from data import load_pairs
from tokenizer_support import real_tokenizer

pairs, info = load_pairs()
toks = {n: real_tokenizer(n) for n in ("smollm2-135m-instruct", "gemma-3-270m")}
books = collections.OrderedDict()
for p in pairs:
    books.setdefault(p["book"], 0)
    books[p["book"]] += 1


def q(xs):
    xs = sorted(xs)
    return {"mean": round(st.mean(xs), 1), "p50": xs[len(xs) // 2], "p90": xs[int(len(xs) * .9)],
            "p99": xs[int(len(xs) * .99)], "max": xs[-1]}


out = {"pairs": len(pairs), "align_info": info, "books": books,
       "ja_chars": q([len(p["ja"]) for p in pairs]), "en_chars": q([len(p["en"]) for p in pairs])}
for n, t in toks.items():
    ja = [len(x) for x in t([p["ja"] for p in pairs], add_special_tokens=False)["input_ids"]]
    en = [len(x) for x in t([p["en"] for p in pairs], add_special_tokens=False)["input_ids"]]
    out[n] = {"ja_tokens": q(ja), "en_tokens": q(en),
              "ja_tok_per_char": round(sum(ja) / sum(len(p["ja"]) for p in pairs), 3),
              # a plain-prompt training example "Japanese: {ja}\nEnglish: {en}\n"
              "example_tokens": q([a + b + 6 for a, b in zip(ja, en)]),
              "frac_example_le_128": round(sum(a + b + 6 <= 128 for a, b in zip(ja, en)) / len(ja), 3),
              "frac_example_le_192": round(sum(a + b + 6 <= 192 for a, b in zip(ja, en)) / len(ja), 3)}
with open("stats.json", "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
print(json.dumps({k: v for k, v in out.items() if k != "books"}, indent=1))
print(len(books), "books:", ", ".join(f"{b} {c}" for b, c in books.items()))
