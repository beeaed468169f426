"""Every training option (`TrainConfig`, a `transformers.TrainingArguments` with calm's options added) and what a
`train()` call returns (`TrainResult`)."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from ..data import LOSS_ON
from ..eval import MATCH_MODES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_NAN = ("stop", "skip")
# calm's earlier option names for TrainingArguments fields: still accepted as flags, config-file keys and run
# records (flags --num-epochs etc.), so that nothing a user wrote before stops working.
RENAMED = {"num_epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
           "grad_accum_steps": "gradient_accumulation_steps", "lr_scheduler": "lr_scheduler_type",
           "eval_batch_size": "per_device_eval_batch_size", "num_workers": "dataloader_num_workers"}
_OLD_NAME = {new: old for old, new in RENAMED.items()}


def _option(default: Any, help: str, choices: Sequence[str] | None = None, name: str = "",
            required: bool = False) -> Any:
    """A field; `name` (a TrainingArguments field calm renamed) also answers to calm's earlier flag."""
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = list(choices)
    if name in _OLD_NAME:
        metadata["aliases"] = ["--" + _OLD_NAME[name].replace("_", "-")]
    if required:
        metadata["required"] = True  # on the command line; the Python API checks it in __post_init__
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig(TrainingArguments):
    """`transformers.TrainingArguments` (every field works, e.g. `optim`, `gradient_checkpointing`,
    `load_best_model_at_end`, `push_to_hub`) with calm's defaults and options. Counts of 0 mean "automatic" or
    "off", as each help says. `HfArgumentParser(TrainConfig)` parses it from flags, JSON or YAML."""

    _argument_group_name = "training (TrainConfig: calm's options and every transformers.TrainingArguments one)"

    # TrainingArguments fields with calm's defaults (and calm's earlier flag names, see RENAMED)
    output_dir: str | None = _option(None, "run directory: final model, train_config.json, metrics, "
                                     "checkpoints/ (required)", required=True)
    num_train_epochs: float = _option(1.0, "passes over the training data (when max_steps <= 0)",
                                      name="num_train_epochs")
    per_device_train_batch_size: int = _option(8, "examples per device per micro-batch",
                                               name="per_device_train_batch_size")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step",
                                               name="gradient_accumulation_steps")
    learning_rate: float = _option(1e-4, "peak learning rate of AdamW")
    lr_scheduler_type: str = _option("cosine", "learning-rate decay after warmup (constant: constant after the "
                                     "warmup; any transformers SchedulerType works)", name="lr_scheduler_type")
    warmup_steps: float = _option(0.03, "linear warmup: steps when >= 1, a fraction of all steps when < 1")
    logging_steps: float = _option(10, "log the training loss every N steps")
    per_device_eval_batch_size: int = _option(0, "examples per device when evaluating; 0: the training batch size",
                                              name="per_device_eval_batch_size")
    save_steps: float = _option(500, "checkpoint every N steps; 0: no checkpoints")
    save_total_limit: int | None = _option(2, "checkpoints to keep (oldest deleted first); 0: keep all")
    dataloader_num_workers: int = _option(0, "data-loader worker processes", name="dataloader_num_workers")
    seed: int = _option(0, "seed for composition init (CLI), data order and everything else random")
    # what the composition's data collator and loss need
    remove_unused_columns: bool = _option(False, "keep the collator's bookkeeping columns (calm needs them)")
    prediction_loss_only: bool = _option(True, "evaluate the loss only (exact match generates instead)")
    ddp_find_unused_parameters: bool | None = _option(False, "DDP: look for unused parameters (calm has none)")

    # calm's own options
    on_nan: str = _option("stop", "on a NaN/inf loss or gradient: stop with an error (keeping the last good "
                          "checkpoint), or skip that optimizer step and go on (counted)", ON_NAN)
    precision: str = _option("auto", "autocast: bf16/fp16 where supported (auto: bf16 on GPUs that have it, "
                             "else fp16 on GPU, fp32 on CPU; --bf16/--fp16 also work)", PRECISIONS)
    max_length: int = _option(512, "tokens per example (at most the models' context, max_position_embeddings); "
                              "longer ones are truncated, with a counted warning")
    strict_length: bool = _option(False, "refuse (an error naming the example) instead of truncating examples "
                                  "longer than max_length or the models' context")
    loss_on: str = _option("auto", "which tokens carry the loss (auto: the completion for prompt/completion "
                           "data, everything for text and chat)", LOSS_ON)
    append_eos: bool = _option(True, "end every example with the tokenizer's EOS token")
    shuffle: bool = _option(True, "reshuffle the training data every epoch (seeded)")
    exact_match: bool = _option(True, "also report exact match of greedy completions (prompt/completion)")
    exact_match_mode: str = _option("stripped", "what counts as exact (calm.eval.is_exact_match): stripped: equal "
                                    "once whitespace at the ends is stripped; exact: the completion, character for "
                                    "character, then EOS", MATCH_MODES)
    max_new_tokens: int = _option(0, "generation length for exact match; 0: longest eval completion + 1")
    max_exact_match_examples: int = _option(0, "evaluate exact match on at most N examples; 0: all")
    resume: bool = _option(False, "continue from the latest complete checkpoint in output_dir (if any)")
    overwrite: bool = _option(False, "delete checkpoints already in output_dir instead of refusing to start")
    cache_augment_states: bool = _option(False, "compute the frozen augments' tapped states once (first "
                                         "epoch) and reuse them afterwards (CALM models only)")
    augment_cache_dir: str = _option("", "keep the augment-state cache as safetensors shards here; '': RAM")
    progress_bar: bool = _option(True, "show a progress bar with loss, learning rate and tokens/s")
    tensorboard: bool = _option(True, "also log to TensorBoard when it is installed (else skipped quietly)")
    plot: bool = _option(True, "write loss.png (the training and eval loss curves) at the end")

    def __post_init__(self) -> None:
        self._record = self._options_as_given()  # before anything below derives from them
        self._check()
        self._derive()
        super().__post_init__()

    def _options_as_given(self) -> dict[str, Any]:
        """calm's options (every field this class declares) and any other TrainingArguments field that differs
        from its default, as given: what train_config.json records, reusable with --config."""
        own = TrainConfig.__annotations__
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.init and not f.name.endswith("_token") and (f.name in own or getattr(self, f.name) != _default(f))}

    def to_record(self) -> dict[str, Any]:
        return dict(self._record)

    def _check(self) -> None:
        """Raise `ValueError` naming the first option with a wrong type or value."""
        for f in fields(self):
            value, kind = getattr(self, f.name), simple_type(f)
            default = _default(f)
            allowed = (int, float) if kind is float else kind
            if kind is None or not isinstance(default, allowed) or value is default is None:
                continue  # (a field of several types, e.g. str | bool, is left to TrainingArguments)
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"TrainConfig.{f.name}={value!r} is invalid: expected {kind.__name__}")
            if f.metadata.get("choices") and value not in f.metadata["choices"]:
                raise ValueError(f"TrainConfig.{f.name}={value!r} is invalid: expected one of "
                                 f"{tuple(f.metadata['choices'])}")
        try:
            SchedulerType(self.lr_scheduler_type)
        except ValueError:
            raise ValueError(f"TrainConfig.lr_scheduler_type={self.lr_scheduler_type!r} is invalid: expected one of "
                             f"{tuple(s.value for s in SchedulerType)}") from None
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected > 0")
        for name in ("eval_steps", "per_device_eval_batch_size", "max_new_tokens", "max_exact_match_examples",
                     "save_steps", "save_total_limit", "dataloader_num_workers", "weight_decay", "warmup_steps",
                     "max_grad_norm", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected >= 0")
        if self.max_steps < -1:
            raise ValueError(f"TrainConfig.max_steps={self.max_steps!r} is invalid: expected >= -1 (<= 0: "
                             "num_train_epochs decides)")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate!r} is invalid: expected > 0")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"TrainConfig.num_train_epochs={self.num_train_epochs!r} is invalid: expected > 0 "
                             "(or set max_steps)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected in [0, 1)")
        if self.precision != "auto" and (self.bf16 or self.fp16):
            raise ValueError(f"TrainConfig.precision={self.precision!r} and bf16/fp16=True both set: choose one")
        for name in ("fsdp_config", "deepspeed"):
            if isinstance(getattr(self, name), str) and getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: no such file")
        if self.fsdp_config and self.deepspeed:
            raise ValueError("TrainConfig.deepspeed and TrainConfig.fsdp_config are both set: choose one")
        if not self.output_dir:
            raise ValueError(f"TrainConfig.output_dir={self.output_dir!r} is invalid: give a run directory")

    def _derive(self) -> None:
        """calm's options and conventions (0 for "off" or "automatic") as the Trainer's fields."""
        if self.max_steps == 0:  # the Trainer counts epochs only for -1
            self.max_steps = -1
        if self.data_seed is None:
            self.data_seed = self.seed
        if self.include_num_input_tokens_seen == "no":  # the tokens/s calm reports
            self.include_num_input_tokens_seen = "non_padding"
        if self.per_device_eval_batch_size == 0:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.save_total_limit == 0:
            self.save_total_limit = None
        if self.save_steps == 0:
            self.save_strategy, self.save_steps = "no", 500
        if self.eval_steps and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            self.eval_strategy = "steps"
        if str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) == "constant" and self.warmup_steps:
            self.lr_scheduler_type = "constant_with_warmup"
        if not self.shuffle:
            self.train_sampling_strategy = "sequential"
        if self.disable_tqdm is None:
            self.disable_tqdm = not self.progress_bar
        if self.fsdp_config and not self.fsdp:
            self.fsdp = True
        if not (self.precision == "auto" and (self.bf16 or self.fp16)):
            self.bf16, self.fp16 = _precision(self.precision)
        # Without an accelerator, say so: it is what makes torchrun processes form a gloo DDP group (and what
        # allows bf16 autocast) on CPUs; otherwise each process would silently train on its own.
        if not torch.accelerator.is_available():
            self.use_cpu = True
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.ddp_backend is None:
                self.ddp_backend = "gloo"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        self.report_to = _integrations(self.report_to)

    def for_trainer(self, checkpoints_dir: Path, has_eval: bool) -> TrainConfig:
        """These options as the Trainer of one run takes them: checkpoints go to `checkpoints_dir` (the run
        directory keeps the final model), and without eval data there is no periodic evaluation."""
        if not has_eval and self.load_best_model_at_end:
            raise ValueError("TrainConfig.load_best_model_at_end=True needs eval data to choose the best model")
        args = copy.copy(self)
        args.output_dir = str(checkpoints_dir)
        if not has_eval:
            args.eval_strategy, args.do_eval = IntervalStrategy.NO, False
        return args

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a config file's or a run record's content; calm's earlier names are taken, see
        RENAMED); unknown keys are an error naming them."""
        values = renamed(values)
        known = {f.name: f for f in fields(cls) if f.init}
        if unknown := sorted(set(values) - set(known)):
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: calm's "
                             f"{sorted(TrainConfig.__annotations__)} and every transformers.TrainingArguments field")
        for name, value in values.items():
            if simple_type(known[name]) is float and isinstance(value, str):
                try:  # YAML reads '1e-4' as a string
                    values[name] = float(value)
                except ValueError:
                    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected float") from None
        return cls(**values)

    @classmethod
    def parser(cls) -> HfArgumentParser:
        """Its flags (`--learning-rate`, calm's earlier `--batch-size`, ...), without -h: the parent of `calm
        train`'s parser."""
        return HfArgumentParser(cls, add_help=False)


_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def simple_type(f: Field) -> type | None:
    """int, float, str or bool for a field of that one type, else None. (HfArgumentParser replaces the annotation
    strings of `from __future__ import annotations` by the types themselves.)"""
    return f.type if f.type in _SIMPLE_TYPES.values() else _SIMPLE_TYPES.get(str(f.type))


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Options under their current names (calm's earlier ones are mapped; giving both is an error)."""
    out = {RENAMED.get(key, key): value for key, value in values.items()}
    if both := sorted(old for old in values if old in RENAMED and RENAMED[old] in values):
        raise ValueError(f"options {[(old, RENAMED[old]) for old in both]} name the same option twice: give one")
    return out


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


def _integrations(report_to: str | list[str] | None) -> list[str] | str:
    """TrainConfig.report_to as TrainingArguments takes it; an unknown or uninstalled integration is refused."""
    from transformers.integrations import get_available_reporting_integrations

    given = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    names = [name.strip() for name in given if name.strip() and name.strip() != "none"]
    if names in (["all"], []):
        return names[0] if names else "none"
    available = get_available_reporting_integrations()
    if unavailable := [name for name in names if name not in available]:
        raise ValueError(f"TrainConfig.report_to names {unavailable}, which transformers cannot report to here "
                         f"(installed integrations: {available or 'none'})")
    return names


def _precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for a precision choice."""
    if precision == "auto":
        if torch.cuda.is_available():
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        return False, False
    return precision == "bf16", precision == "fp16"
