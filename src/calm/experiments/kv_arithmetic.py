"""Key-value arithmetic reproduction (CALM paper §4.1, Table 1): data, tokenizer and the two base models.

Pipeline, each step writing into one run directory:

    build_task(cfg, out_dir)          tokenizer + D_KV + D_C + evaluation sets (JSONL)
    train_base_models(cfg, out_dir)   m_A (KV-Substitution only), m_B (Numeric-Arithmetic only), and the
                                      ablation m_A's: "vanilla" (another key set) and "random" (untrained)
    evaluate_base_models(...)         exact-match accuracy of m_A and m_B on every evaluation set
    (the composition, its baselines and the report: kv_reproduce.py)

Run it: `python -m calm.experiments.kv_arithmetic --out runs/kv [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
    set_seed,
)

from calm.data import IGNORE_INDEX, pad
from calm.eval import greedy_decode, is_exact_match
from calm.tasks.kv_arithmetic import (
    Example,
    KVConfig,
    KVData,
    KVSplits,
    NumberFormat,
    build_tokenizer,
    change_one_digit,
    example_stream,
    make_kv_data,
    make_splits,
    numeric_table,
    numeric_vocabulary,
    read_jsonl,
    write_jsonl,
)

# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelSpec:
    """A small Llama; the paper uses PaLM2-XXS (m_A) and PaLM2-XS/S (m_B)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int


@dataclass
class TrainSpec:
    """One base model's pretraining run (fresh examples every step, so `steps * batch_size` examples)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    # Not in the paper (m_B only): the share of examples whose input blends one operand digit with another,
    # lam * e(d) + (1 - lam) * e(d') with lam ~ U(0, 1), and whose target blends the two results alike
    # (soft-label mixup, `digit_mixup_loss`). m_B then answers sensibly between digits, so a gradient
    # through m_B points the composition towards the right digits instead of nowhere in particular.
    digit_mixup: float = 0.0
    # Not in the paper (m_B only): noise on every operand digit's embedding, the target unchanged
    # (`noisy_digits`). What the composition writes into a key's slots is near the right digit's embedding,
    # never on it, and m_B trained on exact digits misread it. The noise is made of the digit embeddings and is
    # not detached from them, so the loss also shapes the digit embeddings through it.
    digit_noise: float = 0.0


@dataclass
class ExperimentConfig:
    """Everything the base-model half of the reproduction needs; defaults fit a 2-core CPU. The measurements
    behind each choice are in results/kv_arithmetic/README.md."""

    task: KVConfig = field(default_factory=KVConfig)
    # m_A is the smaller model, as in the paper: two blocks whose MLPs are one unit wide, attention only in
    # all but name (a Llama cannot drop its MLP). With only attention between a key's embedding and the
    # digits m_A writes, and weight decay, m_A stores a value as one vector per digit, shared by all keys, so
    # a linear map fitted on D_C's keys reads every key. That map is what the composition has to learn. A narrow
    # m_A keeps the code shared: 500 keys leave 48 dimensions no room for a direction of their own.
    m_a: ModelSpec = field(default_factory=lambda: ModelSpec(2, 48, 4, 1))
    m_b: ModelSpec = field(default_factory=lambda: ModelSpec(4, 128, 4, 512))
    m_a_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=3000, batch_size=64, lr=5e-3,
                                                                    weight_decay=1.0))
    # m_B's reading, not the composition's writing, limits held-out KV-Arithmetic: longer training at a lower
    # learning rate makes m_B's arithmetic better and steadier.
    m_b_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=4500, batch_size=64, lr=1.5e-3,
                                                                    digit_mixup=0.8, digit_noise=0.5))
    vanilla_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=3000, batch_size=64, lr=5e-3,
                                                                        weight_decay=1.0))
    eval_batch_size: int = 250
    num_threads: int = 0  # torch CPU threads; 0 = one per core

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """Tiny models and few steps: runs every step of the pipeline in seconds, accuracy irrelevant."""
        tiny = ModelSpec(2, 32, 2, 64)
        short = TrainSpec(steps=20, batch_size=16, lr=3e-3, warmup_steps=2)
        return cls(task=KVConfig.quick(), m_a=tiny, m_b=ModelSpec(2, 48, 2, 96), m_a_train=short,
                   m_b_train=replace(short, digit_mixup=0.8, digit_noise=0.5), vanilla_train=short, eval_batch_size=64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExperimentConfig:
        nested = {"task": KVConfig, "m_a": ModelSpec, "m_b": ModelSpec, "m_a_train": TrainSpec,
                  "m_b_train": TrainSpec, "vanilla_train": TrainSpec}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in d.items()})

    @classmethod
    def load(cls, out_dir: str | Path) -> ExperimentConfig:
        """The configuration `build_task` saved in a run directory."""
        return cls.from_dict(json.loads((Path(out_dir) / "config.json").read_text()))


def with_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """A copy of `cfg` whose data and every training run use `seed`."""
    return replace(cfg, task=replace(cfg.task, seed=seed), m_a_train=replace(cfg.m_a_train, seed=seed),
                   m_b_train=replace(cfg.m_b_train, seed=seed), vanilla_train=replace(cfg.vanilla_train, seed=seed))


def set_threads(cfg: ExperimentConfig) -> None:
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------
# task: tokenizer + data on disk


@dataclass
class KVTask:
    """What `build_task` produced: the tokenizer, D_KV and its splits, and where they were written."""

    tokenizer: PreTrainedTokenizerFast
    data: KVData
    splits: KVSplits
    out_dir: Path
    vanilla_data: KVData  # another D_KV, none of D_KV's keys: what the vanilla m_A memorises

    @property
    def tokenizer_dir(self) -> Path:
        return self.out_dir / "tokenizer"


def build_task(cfg: ExperimentConfig, out_dir: str | Path) -> KVTask:
    """Draw D_KV, build D_C and the evaluation sets, build the tokenizer; write all of it under `out_dir`.

    Layout: config.json, tokenizer/, data/d_kv.json, data/composition_train.jsonl, data/eval_<name>.jsonl.
    """
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    data = make_kv_data(cfg.task)
    vanilla_data = make_kv_data(cfg.task, seed=cfg.task.seed + 1000, avoid_keys=set(data.table))
    splits = make_splits(cfg.task, data)
    tokenizer = build_tokenizer(cfg.task, keys=[*data.table, *vanilla_data.table])
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "data" / "d_kv.json").write_text(json.dumps(
        {"table": data.table, "seen_keys": data.seen_keys, "unseen_keys": data.unseen_keys}, indent=1))
    write_jsonl(splits.composition_train, out_dir / "data" / "composition_train.jsonl")
    for name, examples in splits.eval_sets.items():
        write_jsonl(examples, out_dir / "data" / f"eval_{name}.jsonl")
    return KVTask(tokenizer=tokenizer, data=data, splits=splits, out_dir=out_dir, vanilla_data=vanilla_data)


def load_eval_sets(out_dir: str | Path) -> dict[str, list[Example]]:
    """The evaluation sets `build_task` wrote, by name."""
    paths = sorted((Path(out_dir) / "data").glob("eval_*.jsonl"))
    return {p.stem.removeprefix("eval_"): read_jsonl(p) for p in paths}


# ----------------------------------------------------------------------------------------------------------
# models


def make_llama(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised small Llama over the shared tokenizer (seeded, so m_A's init is reproducible)."""
    set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=128,  # prompts + completions are < 50 characters
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def collate(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """BOS + prompt + completion + EOS, right-padded; labels are -100 on the prompt and on padding, so the
    loss is on the completion (and its EOS) only."""
    prompts = tokenizer([ex["prompt"] for ex in examples])["input_ids"]  # starts with BOS
    completions = tokenizer([ex["completion"] for ex in examples], add_special_tokens=False)["input_ids"]
    inputs = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
    return {"input_ids": pad(inputs, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(i) for i in inputs], 0),
            "labels": pad(labels, IGNORE_INDEX)}


def soft_label_loss(logits: torch.Tensor, labels: torch.Tensor, alt_labels: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy against a blend of two targets: `weight` (B,) on `labels`, the rest on
    `alt_labels` (-100: ignored). Once the two differ, the teacher-forced prefix is `labels`' and rules the
    alternative out, so from the token after the first difference on all the weight is on `labels`."""
    logp = logits[:, :-1].float().log_softmax(-1)
    gold, alt = labels[:, 1:], alt_labels[:, 1:]
    valid = gold != -100
    nll_gold = -logp.gather(-1, gold.clamp(min=0)[..., None])[..., 0]
    nll_alt = -logp.gather(-1, alt.clamp(min=0)[..., None])[..., 0]
    differs = (gold != alt) & valid
    agreed_so_far = (differs.cumsum(-1) - differs.long()) == 0
    w_gold = weight[:, None]
    w_alt = (1 - weight[:, None]) * agreed_so_far
    w_gold = w_gold / (w_gold + w_alt)
    return ((w_gold * nll_gold + (1 - w_gold) * nll_alt) * valid).sum() / valid.sum()


def noisy_digits(inputs: torch.Tensor, digits: torch.Tensor, where: torch.Tensor, scale: float) -> torch.Tensor:
    """`inputs` (B, T, D) plus noise at the `where` (B, T) positions: a random mix of the digit embeddings
    `digits` (10, D) and a random direction as long as a digit embedding, each scaled per example by
    U(0, `scale`). The mix's coefficients are N(0, 1/10), so at scale 1 it is about as long as one digit.
    The noise is not detached: gradients reach `digits` through it."""
    batch, length, width = inputs.shape
    mix = torch.randn(batch, length, len(digits), device=inputs.device) / len(digits) ** 0.5 @ digits
    direction = torch.nn.functional.normalize(torch.randn(batch, length, width, device=inputs.device), dim=-1)
    direction = direction * digits.norm(dim=-1).mean()
    s, r = (scale * torch.rand(2, batch, 1, 1, device=inputs.device)).unbind()
    return inputs + (s * mix + r * direction) * where[..., None]


def digit_mixup_loss(model: PreTrainedModel, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                     numbers: NumberFormat, share: float, rng: random.Random, noise: float = 0.0) -> torch.Tensor:
    """Loss on Numeric-Arithmetic `examples` where a `share` of them have one operand digit's embedding blended
    with another digit's and the target blended alike (see `TrainSpec.digit_mixup`); with `noise`, every
    operand digit also gets `noisy_digits` noise (`TrainSpec.digit_noise`)."""
    batch = collate(examples, tokenizer)
    alt_examples, alt_ids = list(examples), batch["input_ids"].clone()
    weight = torch.ones(len(examples))
    changed_at = {}  # example -> the index of its changed prompt character
    for b, example in enumerate(examples):
        if rng.random() < share:
            changed_at[b], alt_examples[b] = change_one_digit(example, rng, numbers)
            weight[b] = rng.random()
    if changed_at:  # one tokenizer call for the batch, not one per example
        prefixes = tokenizer([examples[b]["prompt"][:i] for b, i in changed_at.items()])["input_ids"]
        digits = tokenizer.convert_tokens_to_ids([alt_examples[b]["prompt"][i] for b, i in changed_at.items()])
        for b, prefix, digit in zip(changed_at, prefixes, digits, strict=True):
            alt_ids[b, len(prefix)] = digit  # BOS + the tokens before the digit
    alt_labels = collate(alt_examples, tokenizer)["labels"]
    if alt_labels.shape != batch["labels"].shape:
        raise ValueError("digit mixup needs results of one width (KVConfig.fixed_width_numbers=True)")
    device = model.device
    embed = model.get_input_embeddings()
    w = weight.to(device)[:, None, None]
    inputs = w * embed(batch["input_ids"].to(device)) + (1 - w) * embed(alt_ids.to(device))
    if noise:
        digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(string.digits)), device=device)
        ids = batch["input_ids"].to(device)
        operand = torch.isin(ids, digit_ids) & (batch["labels"].to(device) == -100)
        inputs = noisy_digits(inputs, embed.weight[digit_ids], operand, noise)
    logits = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"].to(device)).logits
    return soft_label_loss(logits, batch["labels"].to(device), alt_labels.to(device), weight.to(device))


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stream: Iterator[Example],
    spec: TrainSpec,
    desc: str = "train",
    numbers: NumberFormat | None = None,
) -> list[float]:
    """Train `model` in place on `spec.steps` batches drawn from `stream`; returns the loss per step.

    AdamW + warmup/cosine schedule, gradient clipping at 1.0; accelerate handles the device. With
    `spec.digit_mixup` or `spec.digit_noise`, the stream must be Numeric-Arithmetic written with `numbers`.
    """
    if (spec.digit_mixup or spec.digit_noise) and numbers is None:
        raise ValueError("TrainSpec.digit_mixup and digit_noise need the number format of the Numeric-Arithmetic "
                         "stream")
    set_seed(spec.seed)
    rng = random.Random(spec.seed)
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98),
                                  weight_decay=spec.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(spec.warmup_steps, spec.steps), spec.steps)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc=desc, mininterval=2.0)
    for _ in bar:
        examples = [next(stream) for _ in range(spec.batch_size)]
        if spec.digit_mixup or spec.digit_noise:
            loss = digit_mixup_loss(model, examples, tokenizer, numbers, spec.digit_mixup, rng, spec.digit_noise)
        else:
            batch = collate(examples, tokenizer)
            loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
    model = accelerator.unwrap_model(model)
    model.eval()
    return losses


def mean_embed_untrained_tokens(model: PreTrainedModel, trained_ids: set[int]) -> None:
    """Set the input embedding of every token the model never trained on to the mean of the trained ones.

    Left at their random init, these rows make m_B's state at a key (a token it never saw) differ from key to
    key for no reason, and the composition's queries with it; the mean is the same "unknown token" for all
    (as `resize_token_embeddings` starts new tokens from the mean)."""
    weight = model.get_input_embeddings().weight
    trained = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)
    trained[sorted(trained_ids)] = True
    with torch.no_grad():
        weight[~trained] = weight[trained].mean(0)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class BaseModelPaths:
    """Where `train_base_models` saved each base model (each loadable with `from_pretrained`)."""

    m_a: Path  # KV-Substitution over D_KV: knows the keys' values
    m_b: Path  # Numeric-Arithmetic: knows arithmetic
    m_a_vanilla: Path  # m_A's architecture and recipe, trained on a different key set (ablation; only if asked)
    m_a_random: Path  # m_A's architecture, untrained (ablation)
    tokenizer: Path
    train_seconds: dict[str, float] = field(default_factory=dict)


def train_base_models(cfg: ExperimentConfig, out_dir: str | Path, task: KVTask | None = None,
                      vanilla: bool = True) -> BaseModelPaths:
    """Pretrain m_A, m_B and (with `vanilla`) the vanilla m_A, save them (and the random m_A) under
    `out_dir/models/`.

    The held-out KV-Substitution and Numeric-Arithmetic evaluation prompts are never trained on.
    """
    set_threads(cfg)
    out_dir = Path(out_dir)
    task = task or build_task(cfg, out_dir)
    models_dir = out_dir / "models"
    tok, kv = task.tokenizer, cfg.task
    evals = task.splits.eval_sets
    # The vanilla m_A learns substitution over another D_KV with none of D_KV's keys: same skill, other facts.
    runs = {
        "m_a": (cfg.m_a, cfg.m_a_train, example_stream(kv, task.data, "kv_substitution", seed=kv.seed + 10,
                                                       held_out=evals["kv_substitution"])),
        "m_b": (cfg.m_b, cfg.m_b_train, example_stream(kv, numeric_table(kv), "numeric_arithmetic",
                                                       seed=kv.seed + 20, held_out=evals["numeric_arithmetic"])),
    }
    if vanilla:
        runs["m_a_vanilla"] = (cfg.m_a, cfg.vanilla_train,
                               example_stream(kv, task.vanilla_data, "kv_substitution", seed=kv.seed + 30))
    seconds = {}
    for name, (spec, train, stream) in runs.items():
        model = make_llama(spec, tok, seed=train.seed)
        start = time.perf_counter()
        train_causal_lm(model, tok, stream, train, desc=name, numbers=task.data.numbers)
        seconds[name] = time.perf_counter() - start
        if name == "m_b":
            trained = {tok.bos_token_id, tok.eos_token_id, *tok.convert_tokens_to_ids(numeric_vocabulary(kv))}
            mean_embed_untrained_tokens(model, trained)
        freeze(model).save_pretrained(models_dir / name)
    freeze(make_llama(cfg.m_a, tok, seed=cfg.m_a_train.seed)).save_pretrained(models_dir / "m_a_random")
    (models_dir / "train_seconds.json").write_text(json.dumps(seconds, indent=2))
    return BaseModelPaths(m_a=models_dir / "m_a", m_b=models_dir / "m_b", m_a_vanilla=models_dir / "m_a_vanilla",
                          m_a_random=models_dir / "m_a_random", tokenizer=task.tokenizer_dir,
                          train_seconds=seconds)


def load_frozen(path: str | Path) -> LlamaForCausalLM:
    return freeze(LlamaForCausalLM.from_pretrained(path))


# ----------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalResult:
    accuracy: float  # exact match, in [0, 1]
    predictions: list[str]  # the decoded completion for each example, in the input order ('' if no EOS)


@torch.inference_mode()
def evaluate_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_new_tokens: int | None = None,
    batch_size: int = 250,
    desc: str = "eval",
) -> EvalResult:
    """Greedy-decode each prompt and score it with `calm.eval.is_exact_match` in its "exact" mode: the text up to
    EOS must be the expected string, character for character, and the model must emit EOS right after it.

    Works with any model that has Hugging Face `generate` (the composed CALM model included). Prompts are
    left-padded; they are batched in order of length only to waste less compute on padding.
    """
    if max_new_tokens is None:  # the longest expected completion, plus its EOS
        max_new_tokens = max(len(tokenizer(ex["completion"], add_special_tokens=False)["input_ids"])
                             for ex in examples) + 1
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt"]))
    try:
        completions = greedy_decode(model, tokenizer, [examples[i]["prompt"] for i in order], max_new_tokens,
                                    batch_size, progress=True, desc=desc)
    finally:
        model.train(was_training)
    predictions: list[str] = [""] * len(examples)
    correct = 0
    for i, completion in zip(order, completions):
        predictions[i] = completion.text if completion.ended else ""
        correct += is_exact_match(completion.text, examples[i]["completion"], "exact", completion.ended)
    return EvalResult(accuracy=correct / max(1, len(examples)), predictions=predictions)


def evaluate_models(
    models: dict[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    eval_sets: dict[str, list[Example]],
    batch_size: int = 250,
) -> dict[str, dict[str, float]]:
    """Exact-match accuracy (%) of every model on every evaluation set: {model: {eval set: accuracy}}."""
    return {
        name: {
            set_name: 100 * evaluate_exact_match(model, tokenizer, examples, batch_size=batch_size,
                                                 desc=f"{name}/{set_name}").accuracy
            for set_name, examples in eval_sets.items()
        }
        for name, model in models.items()
    }


def evaluate_base_models(cfg: ExperimentConfig, out_dir: str | Path, paths: BaseModelPaths) -> dict:
    """Table-1 rows for m_A and m_B (and the ablation m_A's), written to `out_dir/base_eval.json`."""
    set_threads(cfg)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.tokenizer)
    models = {"m_a": load_frozen(paths.m_a), "m_b": load_frozen(paths.m_b),
              "m_a_vanilla": load_frozen(paths.m_a_vanilla), "m_a_random": load_frozen(paths.m_a_random)}
    table = evaluate_models(models, tokenizer, load_eval_sets(out_dir), batch_size=cfg.eval_batch_size)
    (Path(out_dir) / "base_eval.json").write_text(json.dumps(table, indent=2))
    return table


# ----------------------------------------------------------------------------------------------------------


def format_table(table: dict[str, dict[str, float]]) -> str:
    sets = list(next(iter(table.values())))
    lines = [f"{'model':<14}" + "".join(f"{s:>22}" for s in sets)]
    lines += [f"{m:<14}" + "".join(f"{row[s]:>22.1f}" for s in sets) for m, row in table.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV arithmetic: build the task and train/evaluate m_A and m_B")
    parser.add_argument("--out", default="runs/kv_arithmetic", help="run directory")
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds; accuracy irrelevant")
    parser.add_argument("--seed", type=int, default=0, help="seed of D_KV, the splits and every training run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    parser.add_argument("--spelled-keys", action="store_true",
                        help="keys spelled letter by letter, unpadded (KVConfig.key_tokens=False, pad_keys=False) "
                             "instead of one token each")
    parser.add_argument("--digit-mixup", type=float, default=None,
                        help="share of m_B's examples trained with a blended digit (TrainSpec.digit_mixup; 0: off)")
    parser.add_argument("--digit-noise", type=float, default=None,
                        help="largest scale of the noise on m_B's operand digits (TrainSpec.digit_noise; 0: off)")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    cfg = with_seed(cfg, args.seed)
    if args.spelled_keys:
        cfg = replace(cfg, task=replace(cfg.task, key_tokens=False, pad_keys=False))
    if args.digit_mixup is not None:
        cfg = replace(cfg, m_b_train=replace(cfg.m_b_train, digit_mixup=args.digit_mixup))
    if args.digit_noise is not None:
        cfg = replace(cfg, m_b_train=replace(cfg.m_b_train, digit_noise=args.digit_noise))
    cfg.num_threads = args.threads
    start = time.perf_counter()
    task = build_task(cfg, args.out)
    paths = train_base_models(cfg, args.out, task)
    table = evaluate_base_models(cfg, args.out, paths)
    print(format_table(table))
    print("train seconds:", {k: round(v, 1) for k, v in paths.train_seconds.items()},
          f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
