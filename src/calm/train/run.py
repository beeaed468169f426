"""`train()`: one training run, from data to the saved model.

Run directory layout: the final model (`calm_config.json`, `config.json`, `model.safetensors` and README.md for a
composition, or the model's own `save_pretrained` files), `train_config.json`, `metrics.jsonl`, `loss.png`,
`checkpoints/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.utils import logging

from ..data import (
    DataError,
    DataSource,
    PaddingCollator,
    TokenizedDataset,
    check_token_ids,
    context_length,
    model_configs,
    pad_token_id,
    tokenize,
)
from ..extras import missing
from ..formats import RUN_RECORD, format_tag
from ..model import CALMForCausalLM
from .augment_cache import AugmentStateCache, RefreshAugmentCache, new_augment_cache
from .checkpoints import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    check_checkpoint,
    check_data_state,
    prepare_run_dir,
    write_text_atomically,
)
from .metrics import METRICS_FILE, PLOT_FILE, EpochTimer, add_logging_callbacks, plot_loss
from .options import TrainConfig, TrainResult
from .trainer import CompositionTrainer

logger = logging.get_logger(__name__)



def train(model: nn.Module, tokenizer: PreTrainedTokenizerBase, train_data: DataSource,
          eval_data: DataSource | None = None, config: TrainConfig | None = None,
          callbacks: Sequence[TrainerCallback] = (), run_info: dict[str, Any] | None = None) -> TrainResult:
    """Train `model`'s parameters that require grad (a CALM model: its composition) and save the result.

    `train_data` / `eval_data`: JSONL path(s), a `datasets.Dataset`, a list of dicts, or the output of
    `calm.data.load_examples` / `calm.data.tokenize`. `run_info` (e.g. the base models' names) is recorded
    in train_config.json next to the options. Works under `torchrun` / `accelerate launch` unchanged.
    """
    if config is None:
        raise ValueError("train() needs config=TrainConfig(output_dir=...): where the run is written")
    max_length, vocab_size = data_limits(config, model_configs(model))
    train_set = prepare_dataset(train_data, tokenizer, config, max_length, vocab_size)
    eval_set = prepare_dataset(eval_data, tokenizer, config, max_length, vocab_size) if eval_data is not None else None
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        # Without a loss scaler float16 gradients underflow, and torch's GradScaler refuses to unscale them.
        raise ValueError("the trainable weights are float16, which cannot be trained reliably: compose with "
                         "composition_dtype='float32' (precision='fp16' still runs them in float16 under autocast) "
                         "or 'bfloat16'")
    is_calm = isinstance(model, CALMForCausalLM)
    if config.cache_augment_states and not is_calm:
        raise ValueError("TrainConfig.cache_augment_states=True needs a CALMForCausalLM (it caches the "
                         f"frozen augments' states), got {type(model).__name__}")

    run_dir = Path(config.output_dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    args = config.for_trainer(checkpoints, has_eval=eval_set is not None)
    resume_from = prepare_run_dir(run_dir, checkpoints, config, args.should_save)
    cache = new_augment_cache(config, args) if config.cache_augment_states else None
    epoch_timer = EpochTimer()
    trainer = CompositionTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        data_collator=PaddingCollator(pad_token_id(tokenizer), aligners=getattr(model, "aligners", None),
                                      augment_mode=model.config.augment_mode if is_calm else "iterative"),
        augment_cache=cache,
        exact_match=config.exact_match, exact_match_mode=config.exact_match_mode,
        max_new_tokens=config.max_new_tokens, max_exact_match_examples=config.max_exact_match_examples,
        on_nan=config.on_nan,
    )
    extra = [epoch_timer, *([RefreshAugmentCache(cache)] if cache is not None else []), *callbacks]
    add_logging_callbacks(trainer, config, run_dir)
    for callback in extra:
        trainer.add_callback(callback)
    if args.should_save:
        _write_run_config(run_dir / CONFIG_FILE, config, train_set, eval_set, run_info or {})
    if is_calm:  # the model card that save_pretrained writes names the data
        model.config.training_data = {name: data_summary(dataset) for name, dataset in
                                      (("train", train_set), ("eval", eval_set)) if dataset is not None}

    if resume_from is not None:
        check_data_state(resume_from, trainer)
        check_checkpoint(resume_from, model)  # before anything is loaded from it
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    _save_final_model(trainer, run_dir)  # before the final evaluation: a failure there loses nothing
    eval_metrics = _final_evaluation(trainer) if eval_set is not None else {}
    if args.should_save and config.plot:
        if note := missing("matplotlib", needed_by=f"{PLOT_FILE} (plot=True)", extra="plot"):
            logger.warning(f"{note}; the losses are in {METRICS_FILE}")
        else:
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
        augment_cache=cache_stats, skipped_steps=trainer.nan_guard.skipped_steps,
    )


def _write_run_config(path: Path, config: TrainConfig, train_set: TokenizedDataset,
                      eval_set: TokenizedDataset | None, run_info: dict[str, Any]) -> None:
    """train_config.json: its format version, the options (reusable with --config), data sizes, and what the
    caller adds."""
    data = {"train_examples": len(train_set), "train_tokens": train_set.stats["tokens"],
            "train_truncated": train_set.num_truncated, "eval_examples": len(eval_set) if eval_set else 0}
    record = {"format": format_tag(RUN_RECORD), "train": config.to_record(), **run_info,
              "data": {**data, **run_info.get("data", {})}}
    write_text_atomically(path, json.dumps(record, indent=2, default=str) + "\n")


def data_summary(dataset: TokenizedDataset) -> dict[str, Any]:
    """What a model card says about a dataset: its files' names (never their directories), format, and how
    many examples and tokens it has."""
    source = ", ".join(Path(part).name for part in dataset.examples.source.split(", "))
    return {"source": source, "format": dataset.format, "examples": len(dataset),
            "tokens": dataset.stats.get("tokens", 0)}


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
