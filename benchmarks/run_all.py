"""Run every benchmark of issue 7 and write BENCHMARKS.md (repo root) and benchmarks/results.json: `make bench`.

    .venv/bin/python benchmarks/run_all.py [--threads 1]

Repeats are set so that the whole run stays near 15 minutes on 2 cores (the small pair's steps take seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import common
import generation
import memory
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
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(common.CLOCKS), default=None,
                        help="default: cpu (process CPU time) with one thread, wall otherwise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common.clock = args.clock or ("cpu" if args.threads == 1 else "wall")

    start = time.perf_counter()
    results: dict = {"machine": common.machine(), "threads": args.threads, "clock": common.clock,
                     "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "repeats": {}, "seconds": {}}
    for section, pair, run, argv in PLAN:
        print(f"== {section} / {pair}", flush=True)
        begin = time.perf_counter()
        result = run(["--pair", pair, "--threads", str(args.threads), "--clock", common.clock, *argv])
        results.setdefault(section, {})[pair] = result
        results["seconds"][f"{section}/{pair}"] = round(time.perf_counter() - begin, 1)
        if "repeats" in result:
            results["repeats"][f"{section}/{pair}"] = result["repeats"]
    results["scaling"] = results["scaling"]["small"]
    results["minutes"] = (time.perf_counter() - start) / 60
    (report.HERE / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (report.ROOT / "BENCHMARKS.md").write_text(report.render(results))
    print(f"wrote BENCHMARKS.md and benchmarks/results.json in {results['minutes']:.1f} min")


if __name__ == "__main__":
    main()
