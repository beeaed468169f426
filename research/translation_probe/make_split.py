"""Proposed split by book (New Testament only: one Japanese translation, Taisho 1917 revision, one style).
Writes splits/{train,val,test}.jsonl as {"prompt": "Japanese: ...\nEnglish:", "completion": " ...", "ref": "Book c:v"}
and prints the counts."""
import json
import os

from data import load_pairs

SPLIT = {
    "train": ["Matthew", "Mark", "Luke"],  # synoptic gospels kept together: many near-parallel verses
    "val": ["John"],
    "test": ["Acts"],
    # everything else (rest of NT, all OT = Meiji 1887 translation, another style) is held out / unused
}
pairs, _ = load_pairs()
os.makedirs("splits", exist_ok=True)
for split, books in SPLIT.items():
    rows = [p for p in pairs if p["book"] in books]
    with open(f"splits/{split}.jsonl", "w") as f:
        for p in rows:
            f.write(json.dumps({"prompt": f"Japanese: {p['ja']}\nEnglish:", "completion": " " + p["en"],
                                "ref": f"{p['book']} {p['chap']}:{p['verse']}"}, ensure_ascii=False) + "\n")
    print(split, books, len(rows))
