"""Train a composition (or any causal LM) with `transformers.Trainer`.

    config = TrainConfig(output_dir="runs/kv", max_steps=2000, eval_steps=200)
    result = train(model, tokenizer, "train.jsonl", "eval.jsonl", config)

The Trainer brings the engine: AdamW on the parameters that require grad (for a CALM model: only the
composition), warmup + cosine/linear schedule, gradient clipping and accumulation, bf16/fp16 autocast, DDP
under `torchrun` / `accelerate launch`, FSDP/DeepSpeed through its own options, and checkpoints holding the
optimizer, scheduler, RNG and trainer state (the data position is the step count: the seeded sampler is
replayed and skipped). This module adds what composition training needs on top:

* checkpoints that are published atomically (written to a staging directory, then renamed), resumed from the
  latest complete one, and hold the composition in safetensors (`CALMForCausalLM.save_pretrained`);
* an optional cache of the frozen augments' tapped states: after the first epoch the augments never run;
* exact-match evaluation of greedy completions, metrics as JSONL, a progress bar with loss, lr and tokens/s,
  and a `loss.png` curve in the run directory.

Run directory layout: the final model (`calm_config.json` + `calm.safetensors` for a composition, or the
model's own `save_pretrained` files), `train_config.json`, `metrics.jsonl`, `loss.png`, `checkpoints/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .config import OPTIONS
from .data import (
    LOSS_ON,
    PROMPT_COMPLETION,
    DataError,
    DataSource,
    ExampleSet,
    PaddingCollator,
    TokenizedDataset,
    check_token_ids,
    context_length,
    load_examples,
    model_configs,
    pad_token_id,
    tokenize,
)
from .eval import exact_match_count
from .model import CALMForCausalLM

logger = logging.get_logger(__name__)

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ON_NAN = ("stop", "skip")
STAGING_PREFIX = ".staging-"  # never matches `checkpoint-*`, so the Trainer's rotation ignores it
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
DATA_STATE_FILE = "data_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
NEVER_LOADED = ("training_args.bin",)  # pickles the Trainer writes but never reads back


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/inf and `TrainConfig.on_nan` is "stop"; the weights were not updated
    with it, and the checkpoints already written are kept."""


class CheckpointError(OSError):
    """A checkpoint could not be written, or one found for resuming cannot be used; the message says which."""


# ------------------------------------------------------------------------------------------ configuration


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


# ------------------------------------------------------------------------------------ augment-state cache


class AugmentStateCache:
    """The frozen augments' tapped states per training example, computed once and reused.

    Keys are dataset row indices. Each example is stored trimmed to its own length, because batches are
    padded per batch and so differ between epochs; a batch is rebuilt by right-padding with zeros, which the
    cross-attention mask hides exactly as it hides the states of real padding.

    In memory (CPU RAM, one cache per process), or with `directory`, as one safetensors shard per first-epoch
    batch. Under DDP every process writes its own shards into the same directory and `refresh()` (run at each
    epoch start) indexes everyone's, so the shuffled batches of later epochs find states that another
    process computed.
    """

    def __init__(self, directory: str | os.PathLike | None = None, writer: str = "rank0") -> None:
        self.directory = Path(directory) if directory else None
        self.writer = writer
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._shard_of: dict[int, Path] = {}
        self._num_shards = 0
        self.num_bytes = 0
        self.hits = 0  # batches served from the cache
        self.misses = 0  # batches whose augment states had to be computed

    def __contains__(self, index: int) -> bool:
        return index in self._memory or index in self._shard_of

    def __len__(self) -> int:
        return len(self._memory) + len(self._shard_of)

    def store(self, indices: Sequence[int], lengths: Sequence[Sequence[int]],
              states: list[dict[int, torch.Tensor]]) -> None:
        """Keep the states of a right-padded batch: `states[k][layer]` is (B, T_k, D) for augment k, and
        `lengths[k][row]` the row's real length in augment k's tokens."""
        per_example = {
            index: {f"{k}.{layer}": tensor[row, :lengths[k][row]].detach().to("cpu", copy=True).contiguous()
                    for k, taps in enumerate(states) for layer, tensor in taps.items()}
            for row, index in enumerate(indices)
        }
        self.num_bytes += sum(t.nbytes for example in per_example.values() for t in example.values())
        if self.directory is None:
            self._memory.update(per_example)
            return
        shard = self.directory / f"{self.writer}-{self._num_shards:08d}.safetensors"
        self._num_shards += 1
        tensors = {f"{index}/{key}": t for index, ex in per_example.items() for key, t in ex.items()}
        partial = shard.with_suffix(".partial")  # renamed when complete: readers never see half a shard
        save_file(tensors, partial)
        os.replace(partial, shard)
        self._shard_of.update(dict.fromkeys(per_example, shard))

    def refresh(self) -> None:
        """Index the shards every process has written so far (reads only their headers)."""
        if self.directory is None:
            return
        known = set(self._shard_of.values())
        for shard in sorted(self.directory.glob("*.safetensors")):
            if shard not in known:
                with safe_open(shard, framework="pt") as f:
                    indices = {int(name.split("/")[0]) for name in f.keys()}  # noqa: SIM118 (not iterable)
                self._shard_of.update(dict.fromkeys(indices, shard))

    def lookup(self, indices: Sequence[int], widths: Sequence[int],
               device: torch.device) -> list[dict[int, torch.Tensor]] | None:
        """The batch's states, augment k's right-padded to `widths[k]`, on `device`; None if any example is
        missing."""
        if not all(index in self for index in indices):
            return None
        per_example = self._load(indices)
        batch: list[dict[int, torch.Tensor]] = []
        for key, first in per_example[0].items():
            k, layer = (int(part) for part in key.split("."))
            padded = first.new_zeros((len(indices), widths[k], first.shape[-1]))
            for row, example in enumerate(per_example):
                padded[row, : example[key].shape[0]] = example[key]
            while len(batch) <= k:
                batch.append({})
            batch[k][layer] = padded.to(device, non_blocking=True)
        return batch

    def _load(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        if self.directory is None:
            return [self._memory[i] for i in indices]
        wanted, loaded = set(indices), {}
        for shard in {self._shard_of[i] for i in indices}:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    index, key = name.split("/")
                    if int(index) in wanted:
                        loaded.setdefault(int(index), {})[key] = f.get_tensor(name)
        return [loaded[i] for i in indices]


class RefreshAugmentCache(TrainerCallback):
    """At each epoch start, pick up the augment states other processes cached (on-disk cache under DDP)."""

    def __init__(self, cache: AugmentStateCache) -> None:
        self.cache = cache

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.cache.refresh()


# --------------------------------------------------------------------------------------------- trainer


class CompositionTrainer(Trainer):
    """`transformers.Trainer` plus the augment-state cache, exact-match evaluation, throughput logging and
    atomic, composition-aware checkpoints. Works for any causal LM; the CALM-specific parts switch off."""

    def __init__(self, *args: Any, augment_cache: AugmentStateCache | None = None, exact_match: bool = True,
                 max_new_tokens: int = 0, max_exact_match_examples: int = 0, on_nan: str = "stop",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.augment_cache = augment_cache
        self.exact_match = exact_match
        self.max_new_tokens = max_new_tokens
        self.max_exact_match_examples = max_exact_match_examples
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan={on_nan!r} is invalid: expected one of {ON_NAN}")
        self.on_nan = on_nan
        self.skipped_steps = 0
        self._nonfinite_loss_at: int | None = None  # the global step whose micro-batch loss was NaN/inf
        self._staging_dir: Path | None = None
        self._throughput_mark: tuple[float, int, int] | None = None
        self.tokens_at_start = 0  # tokens seen before this call's first step (non-zero after a resume)
        self._per_model: tuple[nn.Module, CALMForCausalLM | None, int] | None = None

    def _model_facts(self) -> tuple[CALMForCausalLM | None, int]:
        """The unwrapped CALM model (None for another model) and the non-embedding parameter count, worked out
        once per model: unwrapping and counting each walk every module, and the Trainer did both every step (~5%
        of a LoRA step on m_B)."""
        if self._per_model is None or self._per_model[0] is not self.model:
            unwrapped = self.accelerator.unwrap_model(self.model)
            calm = unwrapped if isinstance(unwrapped, CALMForCausalLM) else None
            counts = hasattr(self.model, "num_parameters")
            count = self.model.num_parameters(exclude_embeddings=True) if counts else 0
            self._per_model = (self.model, calm, count)
        return self._per_model[1:]

    @property
    def calm_model(self) -> CALMForCausalLM | None:
        return self._model_facts()[0]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, 6 x input tokens x non-embedding parameters, with the count cached."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        return 6 * inputs[main_input].numel() * self._model_facts()[1] if main_input in inputs else 0

    # ---- forward

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """Take out the collator's bookkeeping, then add what a composition needs: the prompt lengths (the
        augments read only the prompt in "prompt" mode) and cached augment states."""
        inputs = dict(inputs)
        indices = inputs.pop("example_index", None)
        augment_length = inputs.pop("augment_length", None)
        calm = self.calm_model
        if calm is not None:
            if calm.config.augment_mode == "prompt" and augment_length is not None:
                inputs["augment_length"] = augment_length
            if self.augment_cache is not None and model.training and indices is not None:
                inputs["augment_states"] = self._augment_states(calm, inputs, indices.tolist())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _augment_states(self, calm: CALMForCausalLM, inputs: dict[str, Any], indices: list[int]):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if inputs.get("augment_inputs") is None:  # a collator of its own: align here, as the forward would
            inputs["augment_inputs"] = calm.align(input_ids, attention_mask, inputs.get("augment_length"))
        # Each augment's own tokens: the anchor's for a shared tokenizer, else its aligned ones.
        masks = [attention_mask if own is None else own["attention_mask"] for own in inputs["augment_inputs"]]
        states = self.augment_cache.lookup(indices, [m.shape[1] for m in masks], input_ids.device)
        if states is not None:
            self.augment_cache.hits += 1
            return states
        self.augment_cache.misses += 1
        with self.accelerator.autocast():  # the same precision the augments get inside the forward
            states = calm.compute_augment_states(input_ids, attention_mask, inputs["augment_inputs"])
        self.augment_cache.store(indices, [m.sum(dim=1).tolist() for m in masks], states)
        return states

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if self._throughput_mark is None:  # first step of this call: rates are measured from here
            self.tokens_at_start = self.state.num_input_tokens_seen
            self._throughput_mark = (time.perf_counter(), self.tokens_at_start, self.state.global_step)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):  # the Trainer's own NaN filter syncs on this too
            self._nonfinite_loss_at = self.state.global_step
        return loss

    # ---- NaN / inf guard

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, whose `step` checks that the loss and gradients are finite before updating,
        and the weights after: non-finite values never reach the weights of a checkpoint."""
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer, "_calm_guarded", False):
            update = optimizer.step

            def guarded_step(*args: Any, **kwargs: Any) -> Any:
                if not self._may_update(optimizer):
                    return None
                result = update(*args, **kwargs)
                if not self._all_finite(p for group in optimizer.param_groups for p in group["params"]):
                    self._stop("the weights became NaN or inf in the update", applied=True)
                return result

            optimizer.step = guarded_step
            optimizer._calm_guarded = True
        return optimizer

    def _all_finite(self, tensors: Any) -> bool:
        """Whether every tensor is finite on every process (shards differ under FSDP: all must decide alike)."""
        # Each process checks its own shard. A tensor's min or max is NaN or inf exactly when one of its values
        # is, and on CPU `aminmax` is ~5x faster than `isfinite(t).all()` (which took ~10% of a small model's
        # fine-tuning step).
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        extremes = [torch.stack(torch.aminmax(t)).float() for t in local if t.numel()]
        bad = (~torch.isfinite(torch.stack(extremes)).all()).float() if extremes else torch.zeros(())
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad.to(self.args.device), reduction="sum")
        return not bool(bad > 0)

    def _may_update(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when this step's loss and gradients are finite; otherwise stop (raise) or skip the step (counted).
        Under fp16 the GradScaler skips overflowing steps itself before this is reached, as usual."""
        here = self._nonfinite_loss_at == self.state.global_step
        loss_bad = not self._all_finite([torch.tensor(float("nan") if here else 0.0)])  # on any process
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not loss_bad and self._all_finite(grads):
            return True
        what = "the loss" if loss_bad else "the gradient"
        if self.on_nan == "stop":
            self._stop(f"{what} is NaN or inf", applied=False)
        self.skipped_steps += 1
        logger.warning(f"step {self.state.global_step + 1}: {what} is NaN or inf, update skipped (on_nan='skip'; "
                       f"{self.skipped_steps} skipped so far)")
        optimizer.zero_grad()
        return False

    def _stop(self, what: str, applied: bool) -> None:
        """Raise `NonFiniteLossError` naming the step and the checkpoint that is kept."""
        latest = latest_checkpoint(self.args.output_dir)
        kept = f"the latest checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
        stopped = "before saving it" if applied else "before that update"
        skip = "" if applied else "; or set on_nan='skip' (--on-nan skip) to skip such steps"
        raise NonFiniteLossError(f"{what} at step {self.state.global_step + 1}: training stopped {stopped} "
                                 f"({kept}). Lower the learning rate or check the data, then resume{skip}")

    def train(self, *args: Any, **kwargs: Any):
        self._throughput_mark = None
        return super().train(*args, **kwargs)

    # ---- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add tokens/s and steps/s since the previous training log to every training log."""
        if "loss" in logs and self._throughput_mark is not None:
            now, tokens, step = time.perf_counter(), self.state.num_input_tokens_seen, self.state.global_step
            last_time, last_tokens, last_step = self._throughput_mark
            elapsed = max(now - last_time, 1e-9)
            logs["tokens_per_second"] = round((tokens - last_tokens) / elapsed, 2)
            logs["steps_per_second"] = round((step - last_step) / elapsed, 4)
            self._throughput_mark = (now, tokens, step)
        super().log(logs, start_time)

    # ---- evaluation

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loss evaluation, plus exact match of greedy completions (prompt/completion data)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                          metric_key_prefix)
        dataset = getattr(dataloader, "dataset", None)
        if self.exact_match and isinstance(dataset, TokenizedDataset) and dataset.format == PROMPT_COMPLETION:
            examples = dataset.examples.examples
            if self.max_exact_match_examples:
                examples = examples[: self.max_exact_match_examples]
            output.metrics[f"{metric_key_prefix}_exact_match"] = self._exact_match(examples)
        return output

    def _exact_match(self, examples: list[dict[str, str]]) -> float:
        """Fraction of examples whose greedy completion equals the reference. Under DDP each process takes
        a share; a sharded model (FSDP, DeepSpeed) needs every process in every forward, so there all of
        them generate the same batches in lockstep (`synced_gpus`)."""
        tokenizer = self.processing_class
        completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
        max_new_tokens = self.max_new_tokens or 1 + max(len(ids) for ids in completions)  # + EOS
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        share = examples if sharded else examples[self.args.process_index :: self.args.world_size]
        sync = {"synced_gpus": True} if sharded else {}
        correct = exact_match_count(self.accelerator.unwrap_model(self.model), tokenizer, share, max_new_tokens,
                                    self.args.per_device_eval_batch_size, **sync)
        if sharded:
            return correct / len(examples)
        totals = torch.tensor([correct, len(share)], dtype=torch.float64, device=self.args.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1])

    # ---- checkpoints

    def _get_output_dir(self, trial) -> str:
        if self._staging_dir is not None:  # redirected while a checkpoint is being written
            return str(self._staging_dir)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write the checkpoint into a staging directory, then rename it into place: a process killed at any
        moment leaves either the complete new checkpoint or none, and the previous one untouched."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # model, optimizer, scheduler, RNG, trainer state
            self._staging_dir = None
            self.accelerator.wait_for_everyone()  # every process has written its RNG state
            if self.args.should_save:
                write_data_state(staging / name, self)
                publish_directory(staging / name, run_dir / name)
        except Exception as e:  # disk full, no permission, I/O error: nothing half-written is published
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            latest = latest_checkpoint(run_dir)
            kept = f"the previous checkpoint, {latest.name}, is intact" if latest else "there is no earlier one"
            raise CheckpointError(f"could not save {name} in {run_dir}: {e}. Nothing was published and {kept}; "
                                  "fix the cause (free disk space?) and rerun with resume=True (--resume)") from e
        finally:
            self._staging_dir = None
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Composition checkpoints hold only `calm.safetensors`; other models load the Trainer's way."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, CALMForCausalLM) and not self.is_fsdp_enabled and not self.is_deepspeed_enabled:
            from .serialization import WEIGHTS_NAME, load_checked  # safetensors only: nothing is unpickled

            weights = _checkpoint_weights(Path(resume_from_checkpoint))
            load_checked(target.composition, weights, Path(resume_from_checkpoint) / WEIGHTS_NAME)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def data_identity(trainer: Trainer) -> dict[str, Any]:
    """What fixes the data order and position: with the same data, global batch and seed, the Trainer's
    seeded sampler replays the same order, and the step count says how far into it the run is."""
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    data = trainer.train_dataset
    return {"train_examples": len(data), "train_fingerprint": data.fingerprint(),
            "global_batch_size": global_batch, "data_seed": args.data_seed,
            "shuffle": args.train_sampling_strategy}


def write_data_state(checkpoint: Path, trainer: Trainer) -> None:
    """data_state.json: the data position (step, epoch, examples consumed) and the data's identity."""
    identity = data_identity(trainer)
    state = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
             "examples_seen": trainer.state.global_step * identity["global_batch_size"], **identity}
    (checkpoint / DATA_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def check_data_state(checkpoint: Path, trainer: Trainer) -> None:
    """Refuse to resume where the recorded data position would mean something else."""
    path = checkpoint / DATA_STATE_FILE
    if not path.is_file():  # e.g. a checkpoint written by a plain Trainer
        return
    saved, now = _read_json_object(path, f"cannot resume from {checkpoint}"), data_identity(trainer)
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"cannot resume from {checkpoint}: {key} was {saved[key]!r} and is now {value!r}; the data "
                "position would not match (use the same data, global batch and seed, or start a new run)"
            )


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file: a crash leaves the old content or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json_object(path: Path, context: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{context}: {path.name} cannot be read ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{context}: {path.name} must hold a JSON object")
    return value


def _checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A composition checkpoint's weights, checked against the checksum its calm_config.json records."""
    from .serialization import CONFIG_NAME, load_weights

    config_path = checkpoint / CONFIG_NAME
    config = _read_json_object(config_path, f"cannot resume from {checkpoint}") if config_path.is_file() else {}
    checksum = config.get("weights_sha256")
    return load_weights(checkpoint, expected_sha256=checksum if isinstance(checksum, str) else None)


def check_checkpoint(checkpoint: Path, model: nn.Module) -> None:
    """Read everything a resume from `checkpoint` will load, before any of it is loaded: a damaged or unsafe
    checkpoint is refused with `CheckpointError` (or `ValueError`) and the model stays as it is.

    The trainer state must be a JSON object; a composition's weights must pass their checksum and fit the
    model; every other `*.pt` / `*.pth` / `*.bin` file the Trainer may load must load with
    `torch.load(weights_only=True)`, which refuses anything that would run code (nothing is unpickled in
    full). `training_args.bin` is never read."""
    from .serialization import WEIGHTS_NAME, check_weights

    context = f"cannot resume from {checkpoint}"
    _read_json_object(checkpoint / TRAINER_STATE_FILE, context)
    if isinstance(model, CALMForCausalLM) and (checkpoint / WEIGHTS_NAME).is_file():
        try:
            check_weights(_checkpoint_weights(checkpoint), model.composition, checkpoint / WEIGHTS_NAME)
        except ValueError as e:
            raise CheckpointError(f"{context}: {e}") from None
    for path in sorted(checkpoint.iterdir()):
        if path.suffix not in (".pt", ".pth", ".bin") or path.name in NEVER_LOADED or not path.is_file():
            continue
        try:
            with safe_globals(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                          str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise CheckpointError(
                f"{context}: {path.name} is not a plain tensor file, so it is not loaded (it would run code, or it "
                f"is damaged: {reason}). Delete {checkpoint.name} to resume from the checkpoint before it, or "
                "start over with overwrite=True (--overwrite)") from None


def publish_directory(source: Path, target: Path) -> None:
    """Rename `source` to `target` (atomic on one filesystem); an existing `target` is moved aside first."""
    if target.exists():  # the same step saved again: replace it, never leaving neither
        old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The highest-step complete checkpoint (`checkpoint-N` holding trainer_state.json), or None."""
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return None
    complete = [p for p in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ------------------------------------------------------------------------------------------- callbacks


class MetricsLogger(TrainerCallback):
    """Appends every log (training and evaluation) to `metrics.jsonl` on the main process. On resume, the
    records after the checkpoint's step (from the interrupted run) are dropped first: the file tells one
    history."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        resumed_at = state.global_step  # 0 for a fresh run: start an empty file
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_at] if resumed_at else []
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a kill keeps the old

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if k != "total_flos"}}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class ProgressBar(ProgressCallback):
    """The Trainer's tqdm bar, with the latest loss, learning rate and tokens/s as its postfix instead of
    printed log dicts (those go to metrics.jsonl)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        shown = {"loss": logs.get("loss"), "lr": logs.get("learning_rate"),
                 "tok/s": logs.get("tokens_per_second"), "eval_loss": logs.get("eval_loss"),
                 "eval_em": logs.get("eval_exact_match")}
        postfix = {k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))}
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)


class EpochTimer(TrainerCallback):
    """Wall-clock seconds of each epoch (evaluation included), e.g. to see the augment-state cache at work."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


# ---------------------------------------------------------------------------------------------- train()


def train(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_data: DataSource,
          eval_data: DataSource | None = None, config: TrainConfig | None = None,
          callbacks: Sequence[TrainerCallback] = (), run_info: dict[str, Any] | None = None) -> TrainResult:
    """Train `model`'s parameters that require grad (a CALM model: its composition) and save the result.

    `train_data` / `eval_data`: JSONL path(s), a `datasets.Dataset`, a list of dicts, or the output of
    `calm.data.load_examples` / `calm.data.tokenize`. `run_info` (e.g. the base models' names) is recorded
    in train_config.json next to the options. Works under `torchrun` / `accelerate launch` unchanged.
    """
    config = config or TrainConfig()
    config.validate()
    max_length, vocab_size = data_limits(config, model_configs(model))
    train_set = prepare_dataset(train_data, tokenizer, config, max_length, vocab_size)
    eval_set = prepare_dataset(eval_data, tokenizer, config, max_length, vocab_size) if eval_data is not None else None
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    is_calm = isinstance(model, CALMForCausalLM)
    if config.cache_augment_states and not is_calm:
        raise ValueError("TrainConfig.cache_augment_states=True needs a CALMForCausalLM (it caches the "
                         f"frozen augments' states), got {type(model).__name__}")

    run_dir = Path(config.output_dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    args = training_arguments(config, checkpoints, has_eval=eval_set is not None)
    resume_from = _prepare_run_dir(run_dir, checkpoints, config, args.should_save)
    cache = _augment_cache(config, args) if config.cache_augment_states else None
    epoch_timer = EpochTimer()
    trainer = CompositionTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=PaddingCollator(pad_token_id(tokenizer), aligners=getattr(model, "aligners", None),
                                      augment_mode=model.config.augment_mode if is_calm else "iterative"),
        augment_cache=cache,
        exact_match=config.exact_match, max_new_tokens=config.max_new_tokens,
        max_exact_match_examples=config.max_exact_match_examples, on_nan=config.on_nan,
    )
    extra = [epoch_timer, *([RefreshAugmentCache(cache)] if cache is not None else []), *callbacks]
    _set_callbacks(trainer, config, run_dir, extra)
    if args.should_save:
        _write_run_config(run_dir / CONFIG_FILE, config, train_set, eval_set, run_info or {})

    if resume_from is not None:
        check_data_state(resume_from, trainer)
        check_checkpoint(resume_from, model)  # before anything is loaded from it
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    _save_final_model(trainer, run_dir)  # before the final evaluation: a failure there loses nothing
    eval_metrics = _final_evaluation(trainer) if eval_set is not None else {}
    if args.should_save and config.plot:
        plot_loss(run_dir / METRICS_FILE, run_dir / PLOT_FILE)
    return _result(trainer, output.metrics, eval_metrics, epoch_timer, resume_from, cache)


def _result(trainer: CompositionTrainer, train_metrics: dict[str, float], eval_metrics: dict[str, float],
            epoch_timer: EpochTimer, resume_from: Path | None,
            cache: AugmentStateCache | None) -> TrainResult:
    """What train() returns; rates count this call's steps and tokens only."""
    runtime = float(train_metrics.get("train_runtime", 0.0))
    tokens = trainer.state.num_input_tokens_seen - trainer.tokens_at_start
    cache_stats = {} if cache is None else {"examples": len(cache), "bytes": cache.num_bytes,
                                            "hit_batches": cache.hits, "miss_batches": cache.misses}
    if cache is not None:
        logger.info(f"augment-state cache: {cache_stats}")
    return TrainResult(
        output_dir=Path(trainer.args.output_dir).parent,  # the Trainer writes into run_dir/checkpoints
        global_step=trainer.state.global_step,
        train_loss=float(train_metrics.get("train_loss", "nan")), eval_metrics=eval_metrics,
        runtime_seconds=runtime, steps_per_second=float(train_metrics.get("train_steps_per_second", 0.0)),
        tokens_per_second=tokens / runtime if runtime else 0.0, epoch_seconds=epoch_timer.seconds,
        resumed_from=str(resume_from) if resume_from else None, world_size=trainer.args.world_size,
        augment_cache=cache_stats, skipped_steps=trainer.skipped_steps,
    )


def _augment_cache(config: TrainConfig, args: TrainingArguments) -> AugmentStateCache:
    """An empty augment-state cache; on disk, whatever an earlier run left there is removed first (it may
    belong to other data or other models)."""
    directory = Path(config.augment_cache_dir) if config.augment_cache_dir else None
    with args.main_process_first(local=False, desc="clearing the augment-state cache"):
        if directory is not None and args.process_index == 0:
            shutil.rmtree(directory, ignore_errors=True)
        return AugmentStateCache(directory, writer=f"rank{args.process_index}")


def _write_run_config(path: Path, config: TrainConfig, train_set: TokenizedDataset,
                      eval_set: TokenizedDataset | None, run_info: dict[str, Any]) -> None:
    """train_config.json: the options (reusable with --config), data sizes, and what the caller adds."""
    data = {"train_examples": len(train_set), "train_tokens": train_set.stats["tokens"],
            "train_truncated": train_set.num_truncated, "eval_examples": len(eval_set) if eval_set else 0}
    record = {"train": config.to_dict(), **run_info, "data": {**data, **run_info.get("data", {})}}
    write_text_atomically(path, json.dumps(record, indent=2, default=str) + "\n")


def prepare_dataset(data: DataSource, tokenizer: PreTrainedTokenizerBase, config: TrainConfig,
                    max_length: int | None = None, vocab_size: int | None = None) -> TokenizedDataset:
    """Validate and tokenise, unless `data` is tokenised already; then check that every example fits the model
    (`max_length`, default `config.max_length`, and `vocab_size`): nothing that could fail in the middle of
    training gets past this."""
    max_length = max_length or config.max_length
    if isinstance(data, TokenizedDataset):
        dataset = data
        longest = max((len(row["input_ids"]) for row in dataset.rows), default=0)
        if longest > max_length:
            raise DataError(f"{dataset.examples.source}: a tokenised example has {longest} tokens, more than "
                            f"max_length={max_length} (the models' context or TrainConfig.max_length)")
    else:
        dataset = tokenize(data, tokenizer, max_length, config.loss_on, config.append_eos, config.strict_length)
    if vocab_size is not None:
        check_token_ids(dataset, vocab_size, pad_token_id(tokenizer))
    return dataset


def data_limits(config: TrainConfig, configs: Sequence[PretrainedConfig]) -> tuple[int, int | None]:
    """(max_length, vocab_size) the examples must fit: `config.max_length` lowered to the models' context (the
    smallest `max_position_embeddings`), and the first (anchor) model's vocabulary size."""
    context = context_length(configs)
    max_length = config.max_length if context is None else min(config.max_length, context)
    if max_length < config.max_length:
        logger.info(f"max_length={config.max_length} is longer than the models' context: examples are limited "
                    f"to {max_length} tokens")
    vocab_size = None
    if configs:
        text = configs[0].get_text_config(decoder=True)
        vocab_size = getattr(text, "vocab_size", None)
    return max_length, vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None


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
        report_to="none",  # TensorBoard is added explicitly (when installed); nothing else reports
    )


def _precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for a precision choice."""
    if precision == "auto":
        if torch.cuda.is_available():
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        return False, False
    return precision == "bf16", precision == "fp16"


def _prepare_run_dir(run_dir: Path, checkpoints: Path, config: TrainConfig, is_main: bool) -> Path | None:
    """Create the run directory, drop half-written checkpoints, and find the checkpoint to resume from."""
    found = latest_checkpoint(checkpoints)
    if found is not None and not config.resume and not config.overwrite:
        raise ValueError(f"{checkpoints} already holds checkpoints (latest {found.name}): pass resume=True "
                         "(--resume) to continue that run, or overwrite=True (--overwrite) to start over")
    if is_main:
        if config.overwrite and not config.resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
            found = None
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(f"{STAGING_PREFIX}*"):  # a save that was interrupted
            shutil.rmtree(stale, ignore_errors=True)
    if config.resume and found is None:
        logger.warning(f"resume=True but {checkpoints} holds no complete checkpoint: starting from scratch")
    return found if config.resume else None


def _set_callbacks(trainer: Trainer, config: TrainConfig, run_dir: Path,
                   extra: Sequence[TrainerCallback]) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MetricsLogger(run_dir / METRICS_FILE))
    if config.progress_bar:
        trainer.add_callback(ProgressBar())
    if config.tensorboard and trainer.args.should_save:
        tensorboard = _tensorboard_callback(run_dir / "tensorboard")
        if tensorboard is not None:
            trainer.add_callback(tensorboard)
    for callback in extra:
        trainer.add_callback(callback)


def _tensorboard_callback(log_dir: Path) -> TrainerCallback | None:
    """A TensorBoard logger, or None (quietly) when tensorboard is not installed."""
    from transformers.integrations import TensorBoardCallback, is_tensorboard_available

    if not is_tensorboard_available():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))


def _final_evaluation(trainer: CompositionTrainer) -> dict[str, float]:
    """The last evaluation's metrics, evaluating now unless training just ended with one."""
    history = trainer.state.log_history
    last = next((r for r in reversed(history) if "eval_loss" in r), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _save_final_model(trainer: Trainer, run_dir: Path) -> None:
    """The model's own save_pretrained (through the Trainer, which gathers FSDP/DeepSpeed shards): a CALM
    model writes only its composition; a PEFT model its adapter; a plain model everything."""
    trainer.save_model(str(run_dir))
    if trainer.args.should_save:
        # A pickle of TrainingArguments, never read back: train_config.json records the run.
        (run_dir / "training_args.bin").unlink(missing_ok=True)
    trainer.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- output


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # e.g. the last line of a run killed while writing it
            logger.warning(f"{path}:{number}: not a JSON record, skipped")
    return records


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw the training loss (and eval loss, exact match when logged) against the step."""
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend alone (notebooks).
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_points = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    em_points = [(r["step"], r["eval_exact_match"]) for r in records if "eval_exact_match" in r]
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.add_subplot()
    for points, label, style in ((train_points, "train loss", "-"), (eval_points, "eval loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train_points or eval_points:
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss logged (fewer steps than logging_steps?)", ha="center",
                transform=ax.transAxes)
    if em_points:
        other = ax.twinx()
        other.plot(*zip(*em_points), "s--", color="tab:green", label="eval exact match")
        other.set_ylabel("exact match")
        other.set_ylim(-0.02, 1.02)
        other.legend(loc="upper center")
    fig.savefig(png_path, dpi=100)
    return Path(png_path)


# ------------------------------------------------------------------------------------------ command line


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Define the `calm train` flags: base models, connections, data, and one flag per TrainConfig field."""
    from .cli import add_base_arguments, add_connection_arguments

    add_base_arguments(parser)
    add_connection_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", nargs="+", required=True, help="training JSONL file(s)")
    data.add_argument("--eval-data", nargs="+", default=None, help="evaluation JSONL file(s)")

    options = parser.add_argument_group("training (TrainConfig)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata['help']} (default: {f.default!r})"}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        options.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given (and the `--config` file values the CLI turned into defaults)."""
    return TrainConfig.from_dict({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def run_train(args: argparse.Namespace) -> TrainResult:
    """The `calm train` entry point: check options and data first (cheap, and before any model is loaded),
    then load and compose the base models and train the composition."""
    from .cli import compose_from_args, load_base_config, load_tokenizer

    config = config_from_args(args)
    train_examples = load_examples(args.train_data)
    eval_examples: ExampleSet | None = load_examples(args.eval_data) if args.eval_data else None
    tokenizer_name = args.tokenizer or args.anchor
    tokenizer = load_tokenizer(tokenizer_name)
    # The models' configs (no weights yet) say how long examples may be and which token ids exist.
    max_length, vocab_size = data_limits(config, [load_base_config(name, args)
                                                  for name in (args.anchor, *args.augment)])
    train_set = prepare_dataset(train_examples, tokenizer, config, max_length, vocab_size)
    eval_set = (prepare_dataset(eval_examples, tokenizer, config, max_length, vocab_size)
                if eval_examples is not None else None)
    set_seed(config.seed)  # the composition's initial weights follow the seed too
    model = compose_from_args(args, tokenizer)
    run_info = {
        "model": {"anchor": args.anchor, "augments": list(args.augment), "tokenizer": tokenizer_name,
                  **({"augment_tokenizer": list(args.augment_tokenizer)} if args.augment_tokenizer else {}),
                  "dtype": args.dtype, "connections": model.config.connections,
                  **{key: getattr(model.config, key) for key in OPTIONS}},
        "data": {"train": [str(p) for p in args.train_data], "eval": [str(p) for p in args.eval_data or []]},
    }
    return train(model, tokenizer, train_set, eval_set, config, run_info=run_info)


train_from_args = run_train


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """`python -m calm.train ...` (also under `torchrun -m calm.train ...`): the same flags as `calm train`."""
    from .cli import apply_config_file, build_parser

    args = apply_config_file(build_parser(), ["train", *(sys.argv[1:] if argv is None else argv)])
    result = run_train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": str(result.output_dir), "global_step": result.global_step,
                          "train_loss": result.train_loss, **result.eval_metrics}))
    return result


if __name__ == "__main__":
    main()
