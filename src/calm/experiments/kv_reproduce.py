"""`calm reproduce kv-arithmetic`: the paper's Table 1 (plus its Table 4–5 baselines) from scratch on a CPU.

    build the task and the base models     (kv_arithmetic.py: m_A knows D_KV, m_B knows arithmetic)
    compose m_B with m_A, train on D_C     (calm.compose + calm.train, D_C uses 20% of the keys)
    baselines on the same D_C and budget   (LoRA on m_B with as many parameters, m_B fully fine-tuned)
    ablations (--ablations)                (the issue's D_C with KV-Substitution, from scratch and from CALM;
                                            vanilla m_A, random m_A, m_A reading the prompt only)
    evaluate everything, write the report  (results.md/.json, learning_curves.png, attention.png)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TrainerCallback

import calm
from calm.experiments import matched_lora
from calm.experiments.kv_arithmetic import (
    BaseModelPaths,
    ExperimentConfig,
    build_task,
    evaluate_models,
    load_eval_sets,
    load_frozen,
    set_threads,
    train_base_models,
    with_seed,
)
from calm.tasks.kv_arithmetic import make_splits, read_jsonl
from calm.train import METRICS_FILE, TrainConfig, read_metrics, train

# The embeddings too: every key is a token m_B never trained on, so all keys share one (mean) embedding, and
# without its own adapter there LoRA could not tell two keys apart.
LORA_TARGETS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WITH_SUBSTITUTION = "CALM, D_C + KV-Substitution"
# CALM's trained connection goes on training, with the substitution connection added, on the D_C:
# arithmetic is learnt first, so substitution no longer keeps it from being learnt.
THEN_SUBSTITUTION = "CALM, then D_C + KV-Substitution"
EVAL_SETS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic_seen", "kv_arithmetic_unseen")


@dataclass
class CompositionSpec:
    """How every model trained on D_C is trained: one budget for CALM and the baselines alike. The measurements
    behind each choice are in results/kv_arithmetic/README.md."""

    # (m_A layer, m_B layer); -1 is the embeddings. One connection from m_A's key embeddings into m_B's input:
    # with keys padded to a value's width, the composition's job is to write each key's digits into its
    # slots, where m_B reads them. (The paper taps every 4th block of a much deeper m_A; with m_A's 2 blocks
    # that would be no block at all.)
    connections: list[list[int]] = field(default_factory=lambda: [[-1, -1]])
    # Four times m_B's 4: each of a key's slots reads the key at its own offset and writes its own digit, so
    # heads specialise by slot. More heads also leave the loss plateau more reliably.
    num_heads: int = 16
    # KV-Substitution asks m_B to write out what m_A writes, which m_B cannot do from its inputs: a D_C that
    # holds it adds a connection from m_A's last block into m_B's last, where m_A's next token can be read.
    substitution_connection: bool = True
    # Rotary offsets in the cross-attention (not in the paper): without them a query tells m_A's positions
    # apart by content only, and a key's slots must read the key at offsets 0, 1 and 2.
    rope_theta: float | None = 10000.0
    # Dropout on m_A's states (not in the paper): the composition learns its map from m_A's states to m_B's
    # digits on D_C's 100 keys alone, and dropout makes that map carry over to the other keys. More dropout
    # slows the escape from the loss plateau.
    augment_dropout: float = 0.1
    # m_A's states at unit RMS before f_proj (the library's default). Weight decay leaves m_A's key embeddings
    # about 0.1 long over 48 dimensions, and without it the composition could sit on its loss plateau for long.
    augment_norm: bool = True
    # ~31 passes over D_C's 3,125 examples: time to leave the loss plateau and then converge.
    steps: int = 3000
    batch_size: int = 32
    # Composition layers and LoRA adapters. Steering m_B through its inputs is slow and delicate: higher rates
    # left CALM at a few percent.
    lr: float = 1e-3
    full_finetune_lr: float = 1e-4  # every weight of m_B moves: a smaller step
    weight_decay: float = 0.0  # AdamW's, on every model trained on D_C (research/ tried others with kv_draws.py)

    @classmethod
    def quick(cls) -> CompositionSpec:
        return cls(num_heads=2, steps=8, batch_size=16)


# ------------------------------------------------------------------------------------------ training on D_C


def compose(anchor_path: Path, augment: PreTrainedModel, spec: CompositionSpec, mode: str,
            tasks: tuple[str, ...] = ()) -> calm.CALMForCausalLM:
    """m_B composed with `augment` for a D_C made of `tasks` (see `CompositionSpec.substitution_connection`)."""
    anchor = load_frozen(anchor_path)
    connections = list(spec.connections)
    if spec.substitution_connection and "kv_substitution" in tasks:
        connections.append([augment.config.num_hidden_layers - 1, anchor.config.num_hidden_layers - 1])
    # The layer every result of this reproduction was made with, whatever the library's defaults: queries, keys
    # and values read RMS-normalised states (what qk_norm=True meant before value_norm was split from it), and
    # the output projections start at zero.
    return calm.compose(anchor, augment, connections=connections, num_heads=spec.num_heads, augment_mode=mode,
                        rope_theta=spec.rope_theta, augment_dropout=spec.augment_dropout,
                        augment_norm=spec.augment_norm, qk_norm=True, value_norm=True, init="identity")


def extend(trained: calm.CALMForCausalLM, anchor_path: Path, spec: CompositionSpec,
           tasks: tuple[str, ...]) -> calm.CALMForCausalLM:
    """`compose` over `trained`'s m_A and mode for a D_C made of `tasks`. The connections it shares with
    `trained` start from their trained weights; the ones `tasks` adds start fresh."""
    model = compose(anchor_path, trained.augments[0], spec, trained.config.augment_mode, tasks)
    for new, old, layers, trained_layers in zip(model.config.connections, trained.config.connections,
                                                model.composition, trained.composition, strict=True):
        if new[:len(old)] != old:
            raise ValueError(f"connections {new} do not start with the trained connections {old}")
        for layer, trained_layer in zip(layers, trained_layers):
            layer.load_state_dict(trained_layer.state_dict())
    return model


def lora_model(anchor_path: Path, target_params: int) -> tuple[PreTrainedModel, int]:
    """m_B with LoRA on its embeddings and every attention and MLP projection, as many parameters as
    `target_params` (`matched_lora`)."""
    return matched_lora(load_frozen(anchor_path), target_params, LORA_TARGETS)


def fully_trainable(anchor_path: Path) -> PreTrainedModel:
    model = load_frozen(anchor_path)
    model.requires_grad_(True)
    return model


def train_on_d_c(model: PreTrainedModel, tokenizer, d_c: list[dict], out_dir: Path, spec: CompositionSpec,
                 lr: float, seed: int, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train whatever in `model` requires grad on D_C; return time, steps, mean training loss and the trainable
    parameter count."""
    # float32 on every device, as the base models train: a GPU (picked up when there is one) runs the CPU recipe,
    # not a bf16-autocast variant of it.
    config = TrainConfig(output_dir=str(out_dir), max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
                         learning_rate=lr, weight_decay=spec.weight_decay, warmup_steps=0.05, save_steps=0,
                         logging_steps=10, exact_match=False, precision="fp32",
                         overwrite=True, seed=seed, cache_augment_states=isinstance(model, calm.CALMForCausalLM),
                         plot=False, tensorboard=False)
    start = time.perf_counter()
    result = train(model, tokenizer, d_c, config=config, callbacks=callbacks)
    model.eval()
    return {"seconds": time.perf_counter() - start, "steps": result.global_step, "train_loss": result.train_loss,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# --------------------------------------------------------------------------------------------- the run


@dataclass
class ReproductionResult:
    table: dict[str, dict[str, float]]  # row -> eval set -> exact match (%)
    runs: dict[str, dict]  # row -> time, steps, parameter counts
    seed: int
    seconds: float
    settings: dict = field(default_factory=dict)


def reproduce(out_dir: Path, seed: int = 0, quick: bool = False, ablations: bool = False,
              threads: int = 0) -> ReproductionResult:
    """Run the whole reproduction into `out_dir` and return its table (`threads`: torch CPU threads, 0 for
    one per core)."""
    cfg = with_seed(ExperimentConfig.quick() if quick else ExperimentConfig(), seed)
    cfg.num_threads = threads
    spec = CompositionSpec.quick() if quick else CompositionSpec()
    set_threads(cfg)
    start = time.perf_counter()
    task = build_task(cfg, out_dir)
    paths = train_base_models(cfg, out_dir, task, vanilla=ablations)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.tokenizer)
    d_c = read_jsonl(out_dir / "data" / "composition_train.jsonl")
    eval_sets = {name: examples for name, examples in load_eval_sets(out_dir).items() if name in EVAL_SETS}

    models: dict[str, PreTrainedModel] = {"m_A": load_frozen(paths.m_a), "m_B": load_frozen(paths.m_b)}
    runs: dict[str, dict] = {name: {"seconds": paths.train_seconds[key]} for name, key in
                             (("m_A", "m_a"), ("m_B", "m_b"))}
    runs_dir = out_dir / "runs"

    def add(name: str, model: PreTrainedModel, lr: float, data: list[dict] = d_c) -> None:
        runs[name] = train_on_d_c(model, tokenizer, data, runs_dir / slug(name), spec, lr, seed)
        if isinstance(model, calm.CALMForCausalLM):
            runs[name]["connections"] = model.config.connections
        models[name] = model

    tasks = cfg.task.composition_tasks

    def calm_model(m_a: Path, mode: str = "iterative", d_c_tasks: tuple[str, ...] = tasks) -> calm.CALMForCausalLM:
        return compose(paths.m_b, load_frozen(m_a), spec, mode, d_c_tasks)

    add("CALM", calm_model(paths.m_a), spec.lr)
    lora, rank = lora_model(paths.m_b, runs["CALM"]["trainable_params"])
    add("m_B + LoRA", lora, spec.lr)
    runs["m_B + LoRA"]["rank"] = rank
    add("m_B fine-tuned", fully_trainable(paths.m_b), spec.full_finetune_lr)
    if ablations:
        if "kv_substitution" not in tasks:  # the D_C, for comparison
            with_substitution = replace(cfg.task, composition_tasks=(*tasks, "kv_substitution"))
            d_c_both = make_splits(with_substitution, task.data).composition_train
            add(WITH_SUBSTITUTION, calm_model(paths.m_a, d_c_tasks=with_substitution.composition_tasks), spec.lr,
                d_c_both)
            add(THEN_SUBSTITUTION, extend(models["CALM"], paths.m_b, spec, with_substitution.composition_tasks),
                spec.lr, d_c_both)
        add("CALM, vanilla m_A", calm_model(paths.m_a_vanilla), spec.lr)
        add("CALM, random m_A", calm_model(paths.m_a_random), spec.lr)
        add("CALM, m_A on prompt only", calm_model(paths.m_a, "prompt"), spec.lr)

    table = evaluate_models(models, tokenizer, eval_sets, batch_size=cfg.eval_batch_size)
    result = ReproductionResult(table=table, runs=runs, seed=seed, seconds=time.perf_counter() - start,
                                settings=settings(cfg, spec, paths, models["CALM"]))
    write_report(out_dir, result)
    plot_learning_curves(out_dir, runs_dir, [n for n in runs if (runs_dir / slug(n) / METRICS_FILE).is_file()])
    plot_attention(out_dir / "attention.png", models["CALM"], tokenizer, eval_sets["kv_arithmetic_unseen"][0])
    return result


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def settings(cfg: ExperimentConfig, spec: CompositionSpec, paths: BaseModelPaths, model) -> dict:
    return {"experiment": cfg.to_dict(), "composition": asdict(spec), "connections": model.config.connections,
            "d_c_tasks": list(cfg.task.composition_tasks), "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, torch {torch.__version__}"}


# ------------------------------------------------------------------------------------------------ report

COLUMNS = {"kv_substitution": "KV-Substitution", "numeric_arithmetic": "Numeric-Arithmetic",
           "kv_arithmetic_seen": "KV-Arith (D_C keys)", "kv_arithmetic_unseen": "KV-Arith (held-out keys)"}


def markdown_table(result: ReproductionResult) -> str:
    sets = [s for s in COLUMNS if s in next(iter(result.table.values()))]
    lines = ["| model | " + " | ".join(COLUMNS[s] for s in sets) + " | trainable params | train time |",
             "|---|" + "---:|" * (len(sets) + 2)]
    for name, row in result.table.items():
        run = result.runs.get(name, {})
        params = f"{run['trainable_params']:,}" if "trainable_params" in run else "—"
        if "rank" in run:
            params += f" (rank {run['rank']})"
        seconds = f"{run['seconds']:.0f} s" if "seconds" in run else "—"
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.1f}" for s in sets) + f" | {params} | {seconds} |")
    return "\n".join(lines)


def write_report(out_dir: Path, result: ReproductionResult) -> None:
    (out_dir / "results.json").write_text(json.dumps(asdict(result), indent=2))
    tasks = " + ".join(result.settings["d_c_tasks"])
    text = (f"# Key-value arithmetic (CALM Table 1), seed {result.seed}\n\n{markdown_table(result)}\n\n"
            f"Exact match (%) of greedy completions on held-out expressions. D_C: {tasks} over 20% of the keys. "
            f"Connections (m_A block, m_B block; -1: embeddings): {result.settings['connections']}"
            + "".join(f", {run['connections']} for \"{name}\"" for name, run in result.runs.items()
                      if run.get("connections", result.settings["connections"]) != result.settings["connections"])
            + ". "
            f"Total time {result.seconds / 60:.1f} min.\n")
    (out_dir / "results.md").write_text(text)


def plot_learning_curves(out_dir: Path, runs_dir: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(r["step"], r["loss"]) for r in read_metrics(runs_dir / slug(name) / METRICS_FILE) if "loss" in r]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss on D_C", yscale="log", title="Learning curves on D_C")
    if ax.lines:  # a run shorter than one logging interval (--quick) has no curve to name
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curves.png", dpi=120)
    plt.close(fig)


@torch.no_grad()
def attention_map(model: calm.CALMForCausalLM, tokenizer, example: dict) -> tuple[torch.Tensor, list[str]]:
    """Cross-attention of the last connection (mean over heads) of every anchor position over m_A's positions,
    for the prompt followed by the expected completion."""
    text_ids = tokenizer(example["prompt"])["input_ids"] + tokenizer(example["completion"],
                                                                     add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text_ids])
    layer = model.composition[0][-1]
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(args=args))
    model(input_ids=ids)
    handle.remove()
    anchor_states, keys, _, mask, positions = seen["args"]
    probs = layer.attention_probs(anchor_states, keys, mask, positions)
    return probs[0].mean(0), tokenizer.convert_ids_to_tokens(text_ids)


def plot_attention(path: Path, model: calm.CALMForCausalLM, tokenizer, example: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, tokens = attention_map(model, tokenizer, example)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(probs.numpy(), cmap="viridis")
    ax.set_xticks(range(len(tokens)), tokens, fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ax.set(xlabel="m_A position (key)", ylabel="m_B position (query)",
           title=f"Cross-attention, last connection: {example['prompt']}{example['completion']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- CLI


def run_from_args(args: argparse.Namespace) -> None:
    """`calm reproduce kv-arithmetic [--quick] [--ablations] [--seed N] [--threads N] [--output-dir DIR]`, or
    `--summarize RUN_DIR...` to combine finished runs (one per seed) into mean ± std."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        print(write_summary(out_dir, [Path(d) for d in args.summarize]))
        print(f"\nwritten to {out_dir}/results.md and {out_dir}/results.json")
        return
    result = reproduce(out_dir, seed=args.seed, quick=args.quick, ablations=args.ablations, threads=args.threads)
    print(markdown_table(result))
    print(f"\nwritten to {out_dir}/results.md (and .json, learning_curves.png, attention.png) "
          f"in {result.seconds / 60:.1f} min")


def write_summary(out_dir: Path, run_dirs: list[Path]) -> str:
    """Combine finished runs into `out_dir/results.md` (mean ± std, then each run's own table) and
    `out_dir/results.json`; return the markdown."""
    missing = [str(d) for d in run_dirs if not (d / "results.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json in {', '.join(missing)}: run `calm reproduce kv-arithmetic "
                                "--output-dir DIR` there first")
    runs = [json.loads((d / "results.json").read_text()) for d in run_dirs]
    seeds = [r["seed"] for r in runs]
    minutes = ", ".join(f"{r['seconds'] / 60:.1f}" for r in runs)
    text = (f"# Key-value arithmetic (CALM Table 1): mean ± std over seeds {seeds}\n\n"
            f"{summarize_seeds([d / 'results.json' for d in run_dirs])}\n\n"
            "Exact match (%) of greedy completions on held-out expressions (std: sample standard deviation). "
            f"Minutes per run: {minutes}.\n\n"
            + "\n".join(f"## Seed {r['seed']} ({d})\n\n{(d / 'results.md').read_text().split(chr(10), 2)[2]}"
                        for r, d in zip(runs, run_dirs)))
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(
        {"seeds": seeds, "runs": {str(d): r for d, r in zip(run_dirs, runs)}}, indent=2))
    return text


def summarize_seeds(result_files: list[Path]) -> str:
    """Mean ± std over several seeds' results.json, as a markdown table."""
    tables = [json.loads(p.read_text())["table"] for p in result_files]
    lines = ["| model | " + " | ".join(COLUMNS[s] for s in EVAL_SETS) + " |", "|---|" + "---:|" * len(EVAL_SETS)]
    for name in tables[0]:
        cells = []
        for s in EVAL_SETS:
            xs = [t[name][s] for t in tables]
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1))
            cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
