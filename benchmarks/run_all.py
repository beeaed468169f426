"""Run every benchmark of issue 7 and write BENCHMARKS.md (repo root) and benchmarks/results.json: `make bench`.

    .venv/bin/python benchmarks/run_all.py [--threads 1] [--only SECTION ...]

Repeats are set so that the whole run stays near 20 minutes on 2 cores (the small pair's steps take seconds), plus
about 6 for real_models (§9: real SmolLM2 + Gemma-3, whose steps take 6 s).
`--only cross_tokenizer` (for instance) runs just those sections and merges them into the existing
benchmarks/results.json, keeping the other sections' figures, then re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import common
import cross_tokenizer
import generation
import memory
import real_models
import report
import scaling
import torch
import training

# (section, pair, main, arguments)
PLAN = [
    ("training", "small", training.main, ["--repeats", "7"]),
    ("training", "reference", training.main, ["--repeats", "7"]),
    ("training", "tiny", training.main, ["--repeats", "21"]),
    ("generation", "small", generation.main, ["--repeats", "3"]),
    ("generation", "tiny", generation.main, ["--repeats", "5"]),
    ("memory", "small", memory.main, []),
    ("memory", "tiny", memory.main, []),
    ("scaling", "small", scaling.main, ["--repeats", "5", "--batch", "2"]),
    ("cross_tokenizer", "small", cross_tokenizer.main, ["--repeats", "7", "--gen-repeats", "3"]),
    ("cross_tokenizer", "tiny", cross_tokenizer.main, ["--repeats", "15", "--gen-repeats", "5"]),
    ("cross_tokenizer", "small", cross_tokenizer.main,
     ["--tokenizers", "char+gemma", "--repeats", "5", "--gen-repeats", "3"]),
    ("real_models", real_models.KEY, real_models.main, ["--repeats", "7", "--gen-repeats", "3"]),  # real bases
]
SECTIONS = sorted({section for section, *_ in PLAN})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(common.CLOCKS), default=None,
                        help="default: cpu (process CPU time) with one thread, wall otherwise")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="run only these sections and merge them into the existing benchmarks/results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common.clock = args.clock or ("cpu" if args.threads == 1 else "wall")

    start = time.perf_counter()
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.only:  # keep every other section's figures from the last full run
        results = json.loads((report.HERE / "results.json").read_text())
        results["scaling"] = {"small": results["scaling"]}
        for section in args.only:
            results.pop(section, None)
            for book in ("repeats", "seconds"):
                results[book] = {k: v for k, v in results[book].items() if not k.startswith(f"{section}/")}
    else:
        results = {"machine": common.machine(), "threads": args.threads, "clock": common.clock, "date": now,
                   "repeats": {}, "seconds": {}}
    for section, pair, run, argv in PLAN:
        if args.only and section not in args.only:
            continue
        print(f"== {section} / {pair} {' '.join(argv)}", flush=True)
        begin = time.perf_counter()
        pair_args = ["--pair", pair] if pair in common.PAIRS else []  # real_models: its own two models
        result = run([*pair_args, "--threads", str(args.threads), "--clock", common.clock, *argv])
        key = result.get("key", pair)
        results.setdefault(section, {})[key] = result
        results["seconds"][f"{section}/{key}"] = round(time.perf_counter() - begin, 1)
        repeats = result.get("repeats")
        for part, count in (repeats.items() if isinstance(repeats, dict) else [(None, repeats)]):
            if count is not None:
                results["repeats"][f"{section}/{key}" + (f" ({part})" if part else "")] = count
    results["scaling"] = results["scaling"]["small"]
    minutes = (time.perf_counter() - start) / 60
    if args.only:
        command = f"benchmarks/run_all.py --only {' '.join(args.only)}"
        results.setdefault("partial_runs", {}).update(
            {section: {"date": now, "minutes": minutes, "command": command} for section in args.only})
    else:
        results["minutes"] = minutes
        results.pop("partial_runs", None)
    (report.HERE / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    report.write_page(results)
    print(f"wrote BENCHMARKS.md and benchmarks/results.json in {minutes:.1f} min")


if __name__ == "__main__":
    main()
