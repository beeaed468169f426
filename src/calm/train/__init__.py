"""Train a composition (or any causal LM) with `transformers.Trainer`.

    config = TrainConfig(output_dir="runs/kv", max_steps=2000, eval_steps=200)
    result = train(model, tokenizer, "train.jsonl", "eval.jsonl", config)

The Trainer brings the engine: AdamW on the parameters that require grad (for a CALM model: only the
composition), warmup + cosine/linear schedule, gradient clipping and accumulation, bf16/fp16 autocast, DDP
under `torchrun` / `accelerate launch`, FSDP/DeepSpeed through its own options, and checkpoints holding the
optimizer, scheduler, RNG and trainer state (the data position is the step count: the seeded sampler is
replayed and skipped). This package adds what composition training needs on top, one concern per module:

    options.py        TrainConfig (transformers.TrainingArguments with calm's options), TrainResult
    run.py            train(): data checks, the run directory, train_config.json, the final model
    trainer.py        CompositionTrainer: the Trainer with the parts below plugged in, and exact match
    augment_cache.py  the frozen augments' tapped states, computed in the first epoch and reused after
    nan_guard.py      a NaN/inf loss or gradient stops the run or skips the step; NaN never reaches the weights
    checkpoints.py    checkpoints published atomically, resumed from the latest complete one, checked first
    metrics.py        metrics.jsonl, the progress bar (loss, lr, tokens/s), TensorBoard, loss.png

The command line (`calm train`, `python -m calm.train`) is in `calm.cli`.
"""

from .augment_cache import AugmentStateCache
from .checkpoints import STAGING_PREFIX, CheckpointError, check_checkpoint, check_run_dir, latest_checkpoint
from .metrics import METRICS_FILE, PLOT_FILE, plot_loss, read_metrics
from .nan_guard import NonFiniteLossError
from .options import TrainConfig, TrainResult
from .run import CHECKPOINTS_DIR, CONFIG_FILE, data_limits, prepare_dataset, train
from .trainer import CompositionTrainer

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PLOT_FILE",
    "STAGING_PREFIX",
    "AugmentStateCache",
    "CheckpointError",
    "CompositionTrainer",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "check_checkpoint",
    "check_run_dir",
    "data_limits",
    "latest_checkpoint",
    "plot_loss",
    "prepare_dataset",
    "read_metrics",
    "train",
]
