"""`calm reproduce translation`: the paper's language-inclusivity result (its Tables 2 and 5) on real models.

    load the real bases                      (m_B SmolLM2-135M-Instruct, m_A Gemma-3 270M; different tokenizers)
    Bible verses, split by book              (D_C: Matthew+Mark+Luke, validation: John, test: Acts)
    untrained rows                           (m_B zero- and few-shot, m_A few-shot)
    trained rows, one budget                 (CALM, m_B + LoRA with CALM's parameter count, m_B fine-tuned,
                                              CALM with m_A on the prompt only, CALM with a random m_A)
    chrF / BLEU on the evaluation split, the anchor's English perplexity, report
                                             (results.md/.json, learning_curves.png, chrf_by_length.png)

Every trained row is evaluated as soon as it is trained and then dropped (two copies of m_B, their optimiser
states and Gemma would not fit a small machine together); results.json is rewritten after each row.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import calm
from calm.data import encode_prompts, pad_token_id
from calm.eval import mean_loss
from calm.experiments import matched_lora, with_changes
from calm.packaged import load_model, load_tokenizer
from calm.tasks import translation as task
from calm.train import METRICS_FILE, TrainConfig, read_metrics, train

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINED_ROWS = ("CALM", "m_B + LoRA", "m_B fine-tuned", "CALM, m_A on prompt only", "CALM, random m_A")
UNTRAINED_ROWS = ("m_B, zero-shot", "m_B, few-shot", "m_A, few-shot")
ROWS = (*UNTRAINED_ROWS, *TRAINED_ROWS)
EXAMPLE_ROWS = ("m_B, few-shot", "m_A, few-shot", "m_B + LoRA", "CALM")
NUM_EXAMPLES = 6


@dataclass
class TranslationSpec:
    """The whole recipe (recipe 2). Chosen on the validation split before any of its test numbers was seen; see
    results/translation/README.md."""

    language: str = "uk"  # "uk" (Ukrainian) or "ja" (literary Japanese)
    anchor: str = "smollm2-135m-instruct"  # m_B: packaged name, .gguf file, Hub name or local path
    augment: str = "gemma-3-270m"  # m_A
    eval_split: str = "test"  # "validation" while choosing a recipe; "test" to report
    eval_size: int = 200  # a fixed random subset of the split's verses (the same for every seed)
    train_size: int = 960  # a fixed random subset of D_C's verses
    # General English prose pieces added to D_C (`task.replay_prose`), the same for every row: without them nothing
    # asks a trained row to leave English other than a translation alone. Verses + pieces = 1,200 examples: one
    # pass at the default steps and batch.
    replay_size: int = 240
    # Anchor tokens per example (prompt + completion + EOS); longer verses are left out of every split, so that
    # nothing is truncated (and the backward stays affordable on a CPU).
    max_length: int = 160
    # (m_A block, m_B block). The paper taps every 4th block of m_A; m_B's blocks are its upper half, because
    # the anchor's backward runs from its last block down to the first connected one (16 of 30 blocks here).
    connections: list[list[int]] = field(default_factory=lambda: [[3, 14], [7, 19], [11, 24], [15, 29]])
    num_heads: int = 0  # 0: the anchor's attention heads
    # How f_proj reads m_A's states (calm.compose's augment_norm): through m_A's own next-block input norm, which
    # damps Gemma-3's few massive dimensions (a plain RMS norm keeps them, and every key looks alike).
    augment_norm: bool | str = "block"
    # What m_A reads in the CALM rows (calm.compose's augment_mode): "iterative" (the paper's), or "stepwise", which
    # reads the completion one anchor token at a time, without the cross-tokenizer lag of whole words.
    augment_mode: str = "iterative"
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3  # composition layers (chosen on validation over 1e-3 and 1e-2)
    lora_lr: float = 1e-3  # LoRA adapters: recipe 1's rate, never tuned
    full_finetune_lr: float = 5e-5  # every weight of m_B moves: a much smaller step
    shots: int = 3  # worked examples in the few-shot prompts (fixed D_C verses)
    # Worked examples (the first of `shots`) before every trained row's prompt, in training and evaluation. m_A
    # reads the text it is given: on the bare prompt Gemma-3 270M translates far worse than after a few examples.
    prompt_shots: int = 0
    max_new_tokens: int = 96
    eval_batch_size: int = 16
    perplexity_paragraphs: int = 0  # 0: all of `task.english_prose(eval_split)`

    @classmethod
    def quick(cls, **overrides: Any) -> TranslationSpec:
        """The whole pipeline on real models in a few minutes: a handful of verses and steps, evaluated on the
        validation split (a smoke test has no business looking at the test split)."""
        return cls(**{"eval_split": "validation", "eval_size": 4, "train_size": 8, "steps": 2, "batch_size": 4,
                      "replay_size": 2, "shots": 1, "max_new_tokens": 8, "perplexity_paragraphs": 2,
                      **overrides})


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    train: list[task.Pair]
    eval: list[task.Pair]
    shots: list[task.Pair]
    replay: list[str] = field(default_factory=list)
    prefix: str = ""  # worked examples before every trained row's prompt (`TranslationSpec.prompt_shots`)

    def training_examples(self, language: str) -> list[dict[str, str]]:
        """D_C as the trainer reads it: the verses, then the replayed prose (the trainer shuffles)."""
        verses = [task.example(p, language) for p in self.train]
        verses = [{**v, "prompt": self.prefix + v["prompt"]} for v in verses]
        return verses + [task.replay_example(t) for t in self.replay]

    def prompts(self, language: str) -> list[str]:
        """What a trained row is asked to translate: each evaluation verse's prompt, after the prefix."""
        return [self.prefix + task.prompt(p, language) for p in self.eval]


def make_data(spec: TranslationSpec, tokenizer) -> Data:
    """D_C, the evaluation verses and the few-shot examples, keeping only verses that fit `spec.max_length`."""
    pairs = task.load_pairs(spec.language)

    def fits(pair: task.Pair) -> bool:
        text = task.prompt(pair, spec.language) + f" {pair.english}"
        return len(tokenizer(text)["input_ids"]) + 1 <= spec.max_length  # + EOS

    train_pairs = task.split(pairs, "train", spec.train_size, fits)
    # Shots: short D_C verses outside the training subset, so that the few-shot rows and the trained rows see
    # the same verses at most once.
    chosen = set(train_pairs)
    short = [p for p in task.split(pairs, "train", 0, fits) if p not in chosen and len(p.english) <= 100]
    shots = short[:: max(1, len(short) // 7)][: max(spec.shots, spec.prompt_shots)]
    prefix = task.worked_examples(shots[: spec.prompt_shots], spec.language)
    return Data(train_pairs, task.split(pairs, spec.eval_split, spec.eval_size, fits), shots[: spec.shots],
                replay_pieces(spec, tokenizer), prefix)


def replay_pieces(spec: TranslationSpec, tokenizer) -> list[str]:
    """`spec.replay_size` pieces of `task.replay_prose`, whole sentences packed up to `spec.max_length` tokens as
    an example, drawn once (the same for every seed and row)."""
    if not spec.replay_size:
        return []

    def fits(text: str) -> bool:
        example = task.replay_example(text)
        return len(tokenizer(example["prompt"] + example["completion"])["input_ids"]) + 1 <= spec.max_length

    pieces = []
    for paragraph in task.replay_prose():
        piece = ""
        for sentence in re.split(r"(?<=[.!?]) ", paragraph):
            if piece and not fits(f"{piece} {sentence}"):
                pieces.append(piece)
                piece = sentence
            else:
                piece = f"{piece} {sentence}".strip()
        pieces.append(piece)
    pieces = [p for p in pieces if fits(p) and len(p.split(" ")) > 16]
    if spec.replay_size > len(pieces):
        raise ValueError(f"replay_size={spec.replay_size} is more than the {len(pieces)} prose pieces there are")
    keep = set(random.Random("replay-subset").sample(range(len(pieces)), spec.replay_size))
    return [p for i, p in enumerate(pieces) if i in keep]


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Bases:
    anchor: PreTrainedModel
    augment: PreTrainedModel
    tokenizer: Any
    augment_tokenizer: Any


def load_bases(spec: TranslationSpec, device: str = "cpu") -> Bases:
    anchor, augment = load_model(spec.anchor), load_model(spec.augment)
    for model in (anchor, augment):
        model.requires_grad_(False).to(device)
    return Bases(anchor, augment, load_tokenizer(spec.anchor), load_tokenizer(spec.augment))


def compose(bases: Bases, spec: TranslationSpec, augment: PreTrainedModel | None = None,
            mode: str | None = None) -> calm.CALMForCausalLM:
    return calm.compose(bases.anchor, augment or bases.augment, connections=spec.connections,
                        num_heads=spec.num_heads or None, augment_mode=mode or spec.augment_mode,
                        augment_norm=spec.augment_norm,
                        tokenizer=bases.tokenizer,
                        augment_tokenizer=bases.augment_tokenizer)


def random_augment(augment: PreTrainedModel, seed: int) -> PreTrainedModel:
    """m_A's architecture with fresh random weights (the paper's "random m_A" control), on m_A's device."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(augment.config, dtype=torch.float32).eval()
    return model.requires_grad_(False).to(augment.device)


def lora_model(anchor: PreTrainedModel, target_params: int) -> tuple[PreTrainedModel, int]:
    """A copy of m_B with LoRA on every attention and MLP projection, as many parameters as `target_params`
    (`matched_lora`)."""
    return matched_lora(copy.deepcopy(anchor), target_params, LORA_TARGETS)


def fully_trainable(anchor: PreTrainedModel) -> PreTrainedModel:
    return copy.deepcopy(anchor).requires_grad_(True)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_on_d_c(model: PreTrainedModel, tokenizer, data: Data, spec: TranslationSpec, out_dir: Path, lr: float,
                 seed: int) -> dict:
    """Train whatever in `model` requires grad on D_C; return its time, steps, loss and trainable parameters."""
    # float32 on every device (no bf16 autocast on a GPU): a run on a GPU trains what the CPU recipe trains.
    prefix_tokens = len(tokenizer(data.prefix)["input_ids"]) + 2 if data.prefix else 0  # + a merge at the seam
    examples = data.training_examples(spec.language)
    # Past the first pass over D_C, the frozen m_A's states come from the cache: m_A never runs again.
    several_passes = spec.steps * spec.batch_size > len(examples)
    config = TrainConfig(output_dir=str(out_dir), max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
                         learning_rate=lr, warmup_steps=0.05, save_steps=0, logging_steps=5, exact_match=False,
                         overwrite=True, seed=seed, max_length=spec.max_length + prefix_tokens, strict_length=True,
                         cache_augment_states=several_passes and isinstance(model, calm.CALMForCausalLM),
                         plot=False, tensorboard=False, precision="fp32")
    start = time.perf_counter()
    result = train(model, tokenizer, examples, config=config)
    model.eval()
    return {"seconds": round(time.perf_counter() - start, 1), "steps": result.global_step,
            "train_loss": result.train_loss, "trainable_params": trainable_params(model)}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def translate(model, tokenizer, prompts: list[str], spec: TranslationSpec) -> list[str]:
    """Greedy translations, cut at the first newline. Prompts are batched longest first (less padding) and
    answered in their own order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(tokenizer(prompts[i])["input_ids"]))
    out: dict[int, str] = {}
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), spec.eval_batch_size):
        batch_ids = order[start:start + spec.eval_batch_size]
        batch = {k: v.to(model.device) for k, v in encode_prompts(tokenizer, [prompts[i] for i in batch_ids]).items()}
        generated = model.generate(**batch, max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad_token_id(tokenizer), eos_token_id=eos,
                                   stop_strings=["\n"], tokenizer=tokenizer)
        for i, ids in zip(batch_ids, generated[:, batch["input_ids"].shape[1]:].tolist()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[i] = text.split("\n", 1)[0].strip()
    return [out[i] for i in range(len(prompts))]


def scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"chrF": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "BLEU": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2)}


def chat_prompt(tokenizer, source: str, language: str) -> str:
    """The instruction-tuned anchor's zero-shot prompt, through its chat template."""
    message = f"Translate this {task.LANGUAGES[language]} text into English. Reply with the translation only.\n\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": message + source}], tokenize=False,
                                         add_generation_prompt=True)


def english_perplexity(model, tokenizer, spec: TranslationSpec) -> float:
    """Perplexity on held-out English prose (package descriptions of the evaluation split, not Bible text),
    256-token pieces."""
    prose = task.english_prose(spec.eval_split, spec.perplexity_paragraphs)
    return math.exp(mean_loss(model, tokenizer, [{"text": p} for p in prose], batch_size=8, max_length=256))


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class TranslationResult:
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> {"chrF", "BLEU"}
    perplexity: dict[str, float] = field(default_factory=dict)  # row -> English perplexity
    runs: dict[str, dict] = field(default_factory=dict)  # row -> time, steps, parameters
    outputs: dict[str, list[str]] = field(default_factory=dict)  # row -> translations, in eval order
    # The evaluation verses: where they are, their English (public domain) and their source's length. The
    # sources themselves are not kept (a translation's text may be under copyright).
    verses: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    source_chars: list[int] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)  # a few sources with every row's output
    seed: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


def reproduce(out_dir: Path, spec: TranslationSpec, seed: int = 0, threads: int = 0,
              rows: tuple[str, ...] = ROWS, log: Callable[[str], None] = print,
              device: str = "cpu") -> TranslationResult:
    """Run `rows` (default: every row) into `out_dir` on `device` and return the result, also written there as it
    grows. Greedy decoding makes the untrained rows the same for every seed: later seeds can leave them out."""
    if unknown := [r for r in rows if r not in ROWS]:
        raise ValueError(f"unknown row(s) {unknown}: expected some of {list(ROWS)}")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    bases = load_bases(spec, device)
    tok = bases.tokenizer
    data = make_data(spec, tok)
    sources = [p.source for p in data.eval]
    references = [p.english for p in data.eval]
    result = TranslationResult(verses=[p.ref for p in data.eval], references=references,
                               source_chars=[len(s) for s in sources], seed=seed,
                               settings=settings(spec, data, bases, threads, device))
    log(f"D_C {len(data.train)} verses, {spec.eval_split} {len(data.eval)} verses, shots "
        f"{[p.ref for p in data.shots]}")

    def record(name: str, hypotheses: list[str]) -> None:
        result.outputs[name] = hypotheses
        result.table[name] = scores(hypotheses, references)
        result.seconds = round(time.perf_counter() - start, 1)
        write_report(out_dir, result)
        log(f"{name}: {result.table[name]} ({result.seconds / 60:.1f} min so far)")

    result.perplexity["m_B"] = round(english_perplexity(bases.anchor, tok, spec), 3)
    few_shot = [task.few_shot_prompt(p, data.shots, spec.language) for p in data.eval]
    untrained = {"m_B, zero-shot": (bases.anchor, tok, [chat_prompt(tok, s, spec.language) for s in sources]),
                 "m_B, few-shot": (bases.anchor, tok, few_shot),
                 "m_A, few-shot": (bases.augment, bases.augment_tokenizer, few_shot)}
    for name, (model, tokenizer, inputs) in untrained.items():
        if name in rows:
            record(name, translate(model, tokenizer, inputs, spec))

    prompts = data.prompts(spec.language)
    runs_dir = out_dir / "runs"
    calm_params = trainable_params(compose(bases, spec)) if "m_B + LoRA" in rows else 0
    builders: dict[str, tuple[Callable[[], PreTrainedModel], float]] = {
        "CALM": (lambda: compose(bases, spec), spec.lr),
        "m_B + LoRA": (lambda: lora_model(bases.anchor, calm_params)[0], spec.lora_lr),
        "m_B fine-tuned": (lambda: fully_trainable(bases.anchor), spec.full_finetune_lr),
        "CALM, m_A on prompt only": (lambda: compose(bases, spec, mode="prompt"), spec.lr),
        "CALM, random m_A": (lambda: compose(bases, spec, augment=random_augment(bases.augment, seed)), spec.lr),
    }
    for name, (build, lr) in builders.items():
        if name not in rows:
            continue
        torch.manual_seed(seed)  # composition and LoRA initialisation
        model = build()
        run = train_on_d_c(model, tok, data, spec, runs_dir / slug(name), lr, seed)
        if name == "m_B + LoRA":
            run["rank"] = model.peft_config["default"].r
        result.runs[name] = run
        result.perplexity[name] = round(english_perplexity(model, tok, spec), 3)
        record(name, translate(model, tok, prompts, spec))
        del model
        gc.collect()

    result.examples = example_rows(result, data.eval, NUM_EXAMPLES)
    result.seconds = round(time.perf_counter() - start, 1)
    write_report(out_dir, result)
    plot_learning_curves(out_dir / "learning_curves.png",
                         {r: runs_dir / slug(r) / METRICS_FILE for r in builders if r in rows})
    plot_by_length(out_dir / "chrf_by_length.png", result)
    return result


def slug(name: str) -> str:
    return re.sub(r"_+", "_", "".join(c if c.isalnum() else "_" for c in name.lower())).strip("_")


def settings(spec: TranslationSpec, data: Data, bases: Bases, threads: int, device: str = "cpu") -> dict:
    return {"spec": asdict(spec), "train_verses": len(data.train), "eval_verses": len(data.eval),
            "shots": [p.ref for p in data.shots], "books": task.SPLITS,
            "anchor_layers": bases.anchor.config.num_hidden_layers,
            "augment_layers": bases.augment.config.num_hidden_layers,
            "torch_threads": threads or os.cpu_count(), "device": device,
            "machine": f"{platform.machine()}, torch {torch.__version__}"
                       + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else "")}


# ------------------------------------------------------------------------------------------------ report


def example_rows(result: TranslationResult, verses: list[task.Pair], n: int) -> list[dict[str, str]]:
    """`n` evaluation verses spread evenly over the split, with their source, reference and outputs."""
    picks = sorted({round(k * (len(verses) - 1) / max(1, n - 1)) for k in range(n)})
    return [{"verse": verses[i].ref, "source": verses[i].source, "reference": verses[i].english,
             **{name: result.outputs[name][i] for name in EXAMPLE_ROWS if name in result.outputs}} for i in picks]


def length_buckets(chars: list[int], n: int = 3) -> list[tuple[str, list[int]]]:
    """The evaluation verses in `n` equal groups by source length, each named by its range of characters."""
    order = sorted(range(len(chars)), key=lambda i: chars[i])
    groups = [order[k * len(order) // n:(k + 1) * len(order) // n] for k in range(n)]
    return [(f"{chars[g[0]]}–{chars[g[-1]]}", g) for g in groups if g]


def chrf_by_length(result: TranslationResult) -> dict[str, dict[str, float]]:
    """row -> source-length group -> chrF."""
    import sacrebleu

    return {name: {label: round(sacrebleu.corpus_chrf([hyps[i] for i in idx],
                                                      [[result.references[i] for i in idx]]).score, 1)
                   for label, idx in length_buckets(result.source_chars)}
            for name, hyps in result.outputs.items()}


def markdown_table(result: TranslationResult) -> str:
    base = result.perplexity.get("m_B")
    lines = ["| model | chrF | BLEU | English ppl | trainable params | train time |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in result.table.items():
        run = result.runs.get(name, {})
        ppl = result.perplexity.get(name)
        ppl_text = "—" if ppl is None else f"{ppl:.2f} ({ppl / base:.3f}× m_B)"
        if name.startswith("m_B,") and base is not None:
            ppl_text = f"{base:.2f}"
        params = f"{run['trainable_params']:,}" if "trainable_params" in run else "—"
        if "rank" in run:
            params += f" (rank {run['rank']})"
        seconds = f"{run['seconds'] / 60:.1f} min" if "seconds" in run else "—"
        lines.append(f"| {name} | {row['chrF']:.1f} | {row['BLEU']:.1f} | {ppl_text} | {params} | {seconds} |")
    return "\n".join(lines)


def length_table(result: TranslationResult) -> str:
    by_length = chrf_by_length(result)
    labels = [label for label, _ in length_buckets(result.source_chars)]
    lines = ["| model | " + " | ".join(f"{label} chars" for label in labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(f"{row[label]:.1f}" for label in labels) + " |"
              for name, row in by_length.items()]
    return "\n".join(lines)


def examples_table(result: TranslationResult) -> str:
    if not result.examples:
        return ""
    columns = ["verse", "source", "reference", *[n for n in EXAMPLE_ROWS if n in result.examples[0]]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(e[c].replace("|", "\\|") for c in columns) + " |" for e in result.examples]
    return "\n".join(lines)


def write_report(out_dir: Path, result: TranslationResult) -> None:
    (out_dir / "results.json").write_text(json.dumps(asdict(result), indent=2, ensure_ascii=False))
    spec = result.settings["spec"]
    language = task.LANGUAGES[spec["language"]]
    text = (f"# {language} → English with real models (CALM Tables 2 and 5 shape), seed {result.seed}\n\n"
            f"{markdown_table(result)}\n\n"
            f"chrF (sacrebleu, β=2) and BLEU of greedy translations of {len(result.references)} verses of "
            f"{' + '.join(task.SPLITS[spec['eval_split']])} ({spec['eval_split']} split). m_B = {spec['anchor']}, "
            f"m_A = {spec['augment']}. D_C: {result.settings['train_verses']} verses of "
            f"{' + '.join(task.SPLITS['train'])}{replay_note(spec)}; every trained row: {spec['steps']} steps of "
            f"{spec['batch_size']}. "
            f"Connections (m_A block, m_B block): {spec['connections']}. English perplexity: held-out package "
            f"documentation. Total time {result.seconds / 60:.1f} min on {where(result.settings)}.\n")
    if result.outputs:
        text += f"\n## chrF by source length\n\n{length_table(result)}\n"
    if result.examples:
        text += f"\n## Example translations\n\n{examples_table(result)}\n"
    (out_dir / "results.md").write_text(text)


def where(settings: dict) -> str:
    """What a run ran on, for its report."""
    if settings.get("device", "cpu").startswith("cuda"):
        return f"a GPU ({settings['machine'].rsplit(', ', 1)[-1]})"
    return f"{settings['torch_threads']} CPU thread(s)"


def replay_note(spec: dict) -> str:
    size = spec.get("replay_size", 0)
    return f" and {size} pieces of English prose (the Python Language Reference)" if size else ""


def plot_learning_curves(path: Path, metrics: dict[str, Path]) -> None:
    """Training loss on D_C of each row (row name -> its run's metrics file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, file in metrics.items():
        points = [(r["step"], r["loss"]) for r in read_metrics(file) if "loss" in r] if file.is_file() else []
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss on D_C", title="Learning curves on D_C")
    if ax.lines:  # --quick runs are shorter than one logging interval
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_length(path: Path, result: TranslationResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_length = chrf_by_length(result)
    labels = [label for label, _ in length_buckets(result.source_chars)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in by_length.items():
        ax.plot(range(len(labels)), [row[label] for label in labels], marker="o", label=name)
    ax.set_xticks(range(len(labels)), [f"{label} chars" for label in labels])
    ax.set(xlabel="source verse length", ylabel="chrF", title="chrF by source length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ summary


def summarize(out_dir: Path, run_dirs: list[Path]) -> str:
    """Combine finished runs into mean ± std over seeds in `out_dir/results.md` and `results.json`, and each
    seed's full report (every row, examples, chrF by length, learning curves) in `out_dir/seed<N>/`. A seed's rows
    may be split over several runs (see `merge_by_seed`)."""
    missing = [str(d) for d in run_dirs if not (d / "results.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json in {', '.join(missing)}: run `calm reproduce translation "
                                "--output-dir DIR` there first")
    runs = merge_by_seed([json.loads((d / "results.json").read_text()) for d in run_dirs], run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| model | chrF | BLEU | English ppl / m_B's |", "|---|---:|---:|---:|"]
    stats: dict[str, dict[str, list[float]]] = {}
    names = list(dict.fromkeys(name for r in runs for name in r["table"]))
    for name in names:
        values = {m: [r["table"][name][m] for r in runs if name in r["table"]] for m in ("chrF", "BLEU")}
        ratios = [r["perplexity"][name] / r["perplexity"]["m_B"] for r in runs if name in r["perplexity"]]
        stats[name] = {**values, "ppl_ratio": ratios}
        ppl = mean_std(ratios, 3) if ratios else "—"
        lines.append(f"| {name} | {mean_std(values['chrF'])} | {mean_std(values['BLEU'])} | {ppl} |")
    seeds = [r["seed"] for r in runs]
    per_seed = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    per_seed += [f"| {name} | " + " | ".join(f"{r['table'][name]['chrF']:.1f}" if name in r["table"] else "—"
                                             for r in runs) + " |" for name in names]
    for run in runs:
        write_seed_report(out_dir / f"seed{run['seed']}", run)
    text = (f"# Translation with real models: mean ± std over seeds {seeds}\n\n" + "\n".join(lines) + "\n\n"
            "std: sample standard deviation over the seeds that have the row (an untrained row decodes greedily, "
            "so it is the same for every seed and may come from one run only). Minutes per seed, its rows' "
            "processes added up: " + ", ".join(f"{r['seconds'] / 60:.1f}" for r in runs) + ".\n\n"
            "## chrF by seed\n\n" + "\n".join(per_seed) + "\n\n"
            "Each seed's report (every row, example translations, chrF by source length, learning curves): "
            + ", ".join(f"[seed{s}/results.md](seed{s}/results.md)" for s in seeds) + ".\n")
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps({"seeds": seeds, "stats": stats,
                                                      "runs": [str(d) for d in run_dirs]}, indent=2))
    return text


def write_seed_report(out_dir: Path, run: dict) -> None:
    """One seed's merged rows as a single run's report, with its plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = TranslationResult(**{f.name: run[f.name] for f in fields(TranslationResult)})
    write_report(out_dir, result)
    plot_by_length(out_dir / "chrf_by_length.png", result)
    plot_learning_curves(out_dir / "learning_curves.png", {name: Path(file) for name, file in run["metrics"].items()})


def merge_by_seed(runs: list[dict], run_dirs: list[Path]) -> list[dict]:
    """One run per seed: the rows of one seed may come from several directories (rows run side by side), and
    each row from only one of them. A merged run also maps each trained row to its metrics file (`metrics`)."""
    merged: dict[int, dict] = {}
    for run, directory in zip(runs, run_dirs):
        seed = merged.setdefault(run["seed"], {**run, "table": {}, "perplexity": {}, "runs": {}, "outputs": {},
                                               "examples": [], "metrics": {}, "seconds": 0.0})
        if twice := sorted(set(seed["table"]) & set(run["table"])):
            raise ValueError(f"{directory} has rows {twice} of seed {run['seed']}, which another run directory "
                             "has too: give each row of a seed once")
        if run["verses"] != seed["verses"]:
            raise ValueError(f"{directory} evaluated other verses than another run of seed {run['seed']}: only "
                             "runs of one evaluation split and size merge")
        for key in ("table", "perplexity", "runs", "outputs"):
            seed[key] |= run.get(key, {})
        seed["metrics"] |= {name: str(directory / "runs" / slug(name) / METRICS_FILE) for name in run.get("runs", {})}
        # The same example verses in every run (the same evaluation verses): each run adds its rows' outputs.
        if not seed["examples"]:
            seed["examples"] = [dict(e) for e in run.get("examples", [])]
        else:
            for mine, theirs in zip(seed["examples"], run.get("examples", [])):
                mine |= theirs
        seed["seconds"] += run["seconds"]
    return list(merged.values())


def mean_std(values: list[float], digits: int = 1) -> str:
    """"mean ± std", or the value alone when there is one (a row run for one seed)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ------------------------------------------------------------------------------------------------ CLI


def spec_from_args(args: argparse.Namespace) -> TranslationSpec:
    """The spec the flags describe: `--quick`'s or the default, with the named flags and `--spec FIELD=JSON`."""
    flags = {f.name: getattr(args, f.name) for f in fields(TranslationSpec) if getattr(args, f.name, None) is not None}
    spec = TranslationSpec.quick(**flags) if args.quick else TranslationSpec(**flags)
    return with_changes(spec, args.spec or [])


def run_from_args(args: argparse.Namespace) -> None:
    """`calm reproduce translation [--quick] [--seed N] [--threads N] [--language uk|ja] [--eval-split ...]
    [--output-dir DIR]`, or `--summarize RUN_DIR...` to combine finished runs into mean ± std."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        print(summarize(out_dir, [Path(d) for d in args.summarize]))
        return
    rows = tuple(args.rows) if args.rows else TRAINED_ROWS if args.trained_only else ROWS
    result = reproduce(out_dir, spec_from_args(args), seed=args.seed, threads=args.threads, rows=rows,
                       device=getattr(args, "device", None) or "cpu")
    print(markdown_table(result))
    print(f"\nwritten to {out_dir}/results.md (and .json, learning_curves.png, chrf_by_length.png) "
          f"in {result.seconds / 60:.1f} min")
