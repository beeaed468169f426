"""Every training option (`TrainConfig`), what a `train()` call returns (`TrainResult`), and the translation of
the options into `transformers.TrainingArguments`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ..data import LOSS_ON
from ..eval import MATCH_MODES

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_NAN = ("stop", "skip")


def _option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every training option, with defaults. Counts of 0 mean "automatic" or "off", as each help says."""

    output_dir: str = _option("runs/calm", "run directory: final model, config, metrics, checkpoints/")
    num_epochs: float = _option(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _option(0, "optimizer steps to train for; 0: num_epochs decides")
    batch_size: int = _option(8, "examples per device per micro-batch")
    grad_accum_steps: int = _option(1, "micro-batches per optimizer step")
    learning_rate: float = _option(1e-4, "peak learning rate of AdamW")
    weight_decay: float = _option(0.0, "AdamW weight decay (never applied to biases and norms)")
    adam_beta1: float = _option(0.9, "AdamW beta1")
    adam_beta2: float = _option(0.999, "AdamW beta2")
    lr_scheduler: str = _option("cosine", "learning-rate decay after warmup", SCHEDULERS)
    warmup_steps: float = _option(0.03, "linear warmup: steps when >= 1, a fraction of all steps when < 1")
    max_grad_norm: float = _option(1.0, "clip the gradient norm to this; 0: no clipping")
    on_nan: str = _option("stop", "on a NaN/inf loss or gradient: stop with an error (keeping the last good "
                          "checkpoint), or skip that optimizer step and go on (counted)", ON_NAN)
    precision: str = _option("auto", "autocast: bf16/fp16 where supported (auto: bf16 on GPUs that have it, "
                             "else fp16 on GPU, fp32 on CPU)", PRECISIONS)
    max_length: int = _option(512, "tokens per example (at most the models' context, max_position_embeddings); "
                              "longer ones are truncated, with a counted warning")
    strict_length: bool = _option(False, "refuse (an error naming the example) instead of truncating examples "
                                  "longer than max_length or the models' context")
    loss_on: str = _option("auto", "which tokens carry the loss (auto: the completion for prompt/completion "
                           "data, everything for text)", LOSS_ON)
    append_eos: bool = _option(True, "end every example with the tokenizer's EOS token")
    shuffle: bool = _option(True, "reshuffle the training data every epoch (seeded)")
    eval_steps: int = _option(0, "evaluate every N steps; 0: only at the end (when there is eval data)")
    eval_batch_size: int = _option(0, "examples per device when evaluating; 0: batch_size")
    exact_match: bool = _option(True, "also report exact match of greedy completions (prompt/completion)")
    exact_match_mode: str = _option("stripped", "what counts as exact (calm.eval.is_exact_match): stripped: equal "
                                    "once whitespace at the ends is stripped; exact: the completion, character for "
                                    "character, then EOS", MATCH_MODES)
    max_new_tokens: int = _option(0, "generation length for exact match; 0: longest eval completion + 1")
    max_exact_match_examples: int = _option(0, "evaluate exact match on at most N examples; 0: all")
    save_steps: int = _option(500, "checkpoint every N steps; 0: no checkpoints")
    save_total_limit: int = _option(2, "checkpoints to keep (oldest deleted first); 0: keep all")
    resume: bool = _option(False, "continue from the latest complete checkpoint in output_dir (if any)")
    overwrite: bool = _option(False, "delete checkpoints already in output_dir instead of refusing to start")
    logging_steps: int = _option(10, "log the training loss every N steps")
    seed: int = _option(0, "seed for composition init (CLI), data order and everything else random")
    cache_augment_states: bool = _option(False, "compute the frozen augments' tapped states once (first "
                                         "epoch) and reuse them afterwards (CALM models only)")
    augment_cache_dir: str = _option("", "keep the augment-state cache as safetensors shards here; '': RAM")
    num_workers: int = _option(0, "data-loader worker processes")
    fsdp_config: str = _option("", "shard with FSDP (2) using this JSON config (docs/training.md); '': off")
    deepspeed: str = _option("", "train with DeepSpeed using this JSON config (docs/training.md); '': off")
    progress_bar: bool = _option(True, "show a progress bar with loss, learning rate and tokens/s")
    tensorboard: bool = _option(True, "also log to TensorBoard when it is installed (else skipped quietly)")
    report_to: str = _option("", "also report to these transformers integrations, comma-separated (e.g. "
                             "'wandb,mlflow'; each must be installed); '': none beyond metrics.jsonl and tensorboard")
    plot: bool = _option(True, "write loss.png (the training and eval loss curves) at the end")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first field with a wrong type or value."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"TrainConfig.{f.name}={value!r} is invalid: expected {kind.__name__}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"TrainConfig.{f.name}={value!r} is invalid: expected one of "
                                 f"{tuple(f.metadata['choices'])}")
        positive = ("batch_size", "grad_accum_steps", "max_length", "logging_steps")
        non_negative = ("max_steps", "eval_steps", "eval_batch_size", "max_new_tokens",
                        "max_exact_match_examples", "save_steps", "save_total_limit", "num_workers",
                        "weight_decay", "warmup_steps", "max_grad_norm", "seed")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected > 0")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected >= 0")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate!r} is invalid: expected > 0")
        if self.max_steps == 0 and not self.num_epochs > 0:
            raise ValueError(f"TrainConfig.num_epochs={self.num_epochs!r} is invalid: expected > 0 "
                             "(or set max_steps)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected in [0, 1)")
        if not self.output_dir:
            raise ValueError("TrainConfig.output_dir='' is invalid: give a run directory")
        for name in ("fsdp_config", "deepspeed"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: no such file")
        if self.fsdp_config and self.deepspeed:
            raise ValueError("TrainConfig.deepspeed and TrainConfig.fsdp_config are both set: choose one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a config file's content); unknown keys are an error naming them."""
        kinds = {f.name: type(f.default) for f in fields(cls)}
        if unknown := sorted(set(values) - set(kinds)):
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(kinds)}")
        values = dict(values)
        for name, value in values.items():
            if kinds[name] is float and isinstance(value, str):  # YAML reads '1e-4' as a string
                try:
                    values[name] = float(value)
                except ValueError:
                    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected float") from None
        return cls(**values)


@dataclass
class TrainResult:
    """What a `train()` call did. Rates cover this call only (not the steps before a resume)."""

    output_dir: Path
    global_step: int
    train_loss: float
    eval_metrics: dict[str, float]
    runtime_seconds: float
    steps_per_second: float
    tokens_per_second: float
    epoch_seconds: list[float]
    resumed_from: str | None
    world_size: int
    augment_cache: dict[str, int] = field(default_factory=dict)  # this process's cache statistics
    skipped_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (on_nan="skip")


def training_arguments(config: TrainConfig, checkpoints_dir: Path, has_eval: bool) -> TrainingArguments:
    """Translate a TrainConfig into the Trainer's arguments."""
    bf16, fp16 = _precision(config.precision)
    scheduler = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    periodic_eval = has_eval and config.eval_steps > 0
    on_cpu = not torch.accelerator.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        lr_scheduler_type=scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        fp16=fp16,
        # Without an accelerator, say so: it is what makes torchrun processes form a gloo DDP group (and
        # what allows bf16 autocast) on CPUs; otherwise each process would silently train on its own.
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=config.eval_steps if periodic_eval else None,
        prediction_loss_only=True,  # logits are never gathered; exact match generates instead
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit or None,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        dataloader_num_workers=config.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # the collator's bookkeeping columns are taken out in compute_loss
        ddp_find_unused_parameters=False,
        fsdp=True if config.fsdp_config else None,
        fsdp_config=config.fsdp_config or None,
        deepspeed=config.deepspeed or None,
        disable_tqdm=not config.progress_bar,
        # The run's own TensorBoard logger is added explicitly (when installed); others only when asked for.
        report_to=_integrations(config.report_to),
    )


def _integrations(report_to: str) -> list[str] | str:
    """TrainConfig.report_to as TrainingArguments takes it; an unknown or uninstalled integration is refused."""
    from transformers.integrations import get_available_reporting_integrations

    names = [name.strip() for name in report_to.split(",") if name.strip()]
    available = get_available_reporting_integrations() if names else []
    if unavailable := [name for name in names if name not in available]:
        raise ValueError(f"TrainConfig.report_to names {unavailable}, which transformers cannot report to here "
                         f"(installed integrations: {available or 'none'})")
    return names or "none"


def _precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for a precision choice."""
    if precision == "auto":
        if torch.cuda.is_available():
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        return False, False
    return precision == "bf16", precision == "fp16"

