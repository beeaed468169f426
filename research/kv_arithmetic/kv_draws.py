"""How much does the composition's own seed matter? CALM retrained on one run's D_C from several seeds.

The base models, D_C and the recipe stay those of the run; only the composition's initialisation and data order
change. Every `--every` steps the script scores exact match on the first `--examples` held-out KV-Arithmetic
expressions over D_C's keys and over the other keys, so each draw's escape from its plateau shows next to where it
ends. The reproduction's own CALM is one more draw: its seed is drawn after the base models', so it matches none
of these.

    python research/kv_arithmetic/kv_draws.py RUN_DIR [--seeds 0 1 2] [--every 500] [--spec FIELD=JSON ...]
        [--threads N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, TrainerCallback, set_seed

from calm.experiments import with_changes
from calm.experiments.kv_arithmetic import ExperimentConfig, evaluate_models, load_eval_sets, load_frozen
from calm.experiments.kv_reproduce import CompositionSpec, compose, train_on_d_c
from calm.formats import upgrade_options
from calm.tasks.kv_arithmetic import read_jsonl

SPLITS = {"kv_arithmetic_seen": "D_C keys", "kv_arithmetic_unseen": "held-out keys"}


class ScoreEvery(TrainerCallback):
    """Exact match (%) of the model being trained on each evaluation set, every `every` optimizer steps."""

    def __init__(self, model, tokenizer, eval_sets: dict[str, list[dict]], every: int) -> None:
        self.model, self.tokenizer, self.eval_sets, self.every = model, tokenizer, eval_sets, every
        self.scores: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.every == 0:
            scores = evaluate_models({"CALM": self.model}, self.tokenizer, self.eval_sets)["CALM"]
            self.scores.append({"step": state.global_step, **scores})


def run_spec(run_dir: Path) -> CompositionSpec:
    """The composition recipe the run was made with (the current default for a run still without results)."""
    results = run_dir / "results.json"
    if not results.is_file():
        return CompositionSpec()
    saved = json.loads(results.read_text())["settings"]["composition"]
    # results.json records no format version. A field the run lacks is an option it predates: rebuild it as it
    # was made, as a saved composition of format version 1 is.
    options = upgrade_options(saved, version=1)
    # Options the spec does not carry (composition_dtype: its layers are float32) stay at compose()'s defaults.
    return CompositionSpec(**{f.name: options[f.name] for f in fields(CompositionSpec) if f.name in options})


def draws(run_dir: Path, seeds: Sequence[int], every: int = 500, examples: int = 150,
          spec: CompositionSpec | None = None) -> list[dict]:
    """Train the run's CALM recipe (or `spec`) once per composition seed; per seed, the scores along the way and
    at the end (on the whole evaluation sets). The trained compositions go to `run_dir/draws/seed<N>`."""
    spec = spec or run_spec(run_dir)
    cfg = ExperimentConfig.load(run_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
    d_c = read_jsonl(run_dir / "data" / "composition_train.jsonl")
    eval_sets = {name: examples for name, examples in load_eval_sets(run_dir).items() if name in SPLITS}
    records = []
    for seed in seeds:
        set_seed(seed)
        model = compose(run_dir / "models" / "m_b", load_frozen(run_dir / "models" / "m_a"), spec, "iterative",
                        cfg.task.composition_tasks)
        scores = ScoreEvery(model, tokenizer, {n: e[:examples] for n, e in eval_sets.items()}, every)
        run = train_on_d_c(model, tokenizer, d_c, run_dir / "draws" / f"seed{seed}", spec, spec.lr, seed,
                           callbacks=[scores])
        final = evaluate_models({"CALM": model}, tokenizer, eval_sets)["CALM"]
        records.append({"seed": seed, "along_the_way": scores.scores, "final": final, "train_loss": run["train_loss"],
                        "seconds": run["seconds"]})
    return records


def markdown(records: list[dict]) -> str:
    steps = [s["step"] for s in records[0]["along_the_way"]]
    lines = ["| seed | " + " | ".join(f"step {s}" for s in steps) + " | final |",
             "|---:|" + "---|" * (len(steps) + 1)]
    for r in records:
        cells = [" / ".join(f"{s[name]:.0f}" for name in SPLITS) for s in r["along_the_way"]]
        cells.append(" / ".join(f"{r['final'][name]:.1f}" for name in SPLITS))
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nKV-Arithmetic exact match (%), " + " / ".join(SPLITS.values()) + "."


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CALM retrained on a run's D_C from several composition seeds")
    parser.add_argument("run_dir", type=Path, help="a `calm reproduce kv-arithmetic` output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="composition seeds")
    parser.add_argument("--every", type=int, default=500, help="score every N optimizer steps")
    parser.add_argument("--examples", type=int, default=150, help="expressions per split scored along the way")
    parser.add_argument("--spec", nargs="+", default=[], metavar="FIELD=JSON",
                        help="change the run's CompositionSpec, e.g. steps=1000 weight_decay=1.0")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = with_changes(run_spec(args.run_dir), args.spec)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    records = draws(args.run_dir, args.seeds, args.every, args.examples, spec)
    (args.run_dir / "draws" / "draws.json").write_text(json.dumps({"spec": asdict(spec), "draws": records}, indent=2))
    print(markdown(records))


if __name__ == "__main__":
    main()
