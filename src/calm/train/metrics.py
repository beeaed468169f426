"""What a run logs: metrics.jsonl (every training and evaluation log), a progress bar, TensorBoard when it is
installed, per-epoch times, and the loss.png curve drawn from metrics.jsonl at the end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging

from .checkpoints import write_text_atomically
from .options import TrainConfig

logger = logging.get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def add_logging_callbacks(trainer: Trainer, config: TrainConfig, run_dir: Path) -> None:
    """Replace the Trainer's printed log dicts with metrics.jsonl, the progress bar and TensorBoard, as `config`
    asks."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MetricsLogger(run_dir / METRICS_FILE))
    if config.progress_bar:
        trainer.add_callback(ProgressBar())
    if config.tensorboard and trainer.args.should_save:
        tensorboard = tensorboard_callback(run_dir / "tensorboard")
        if tensorboard is not None:
            trainer.add_callback(tensorboard)


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



def tensorboard_callback(log_dir: Path) -> TrainerCallback | None:
    """A TensorBoard logger, or None (quietly) when tensorboard is not installed."""
    from transformers.integrations import TensorBoardCallback, is_tensorboard_available

    if not is_tensorboard_available():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return TensorBoardCallback(SummaryWriter(log_dir=str(log_dir)))



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
