"""Checkpoints: published atomically (written to a staging directory, then renamed), found for resuming, and
checked before anything is loaded from them."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..model import CALMForCausalLM
from ..serialization import CONFIG_NAME, check_weights, load_weights, weights_file
from .options import TrainConfig

logger = logging.get_logger(__name__)

STAGING_PREFIX = ".staging-"  # never matches `checkpoint-*`, so the Trainer's rotation ignores it
DATA_STATE_FILE = "data_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"  # the run record, written before training starts
CHECKPOINTS_DIR = "checkpoints"
NEVER_LOADED = ("training_args.bin",)  # pickles the Trainer writes but never reads back


class CheckpointError(OSError):
    """A checkpoint could not be written, or one found for resuming cannot be used; the message says which."""


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


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A composition checkpoint's weights, checked against the checksum its calm_config.json records."""
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
    context = f"cannot resume from {checkpoint}"
    _read_json_object(checkpoint / TRAINER_STATE_FILE, context)
    weights = weights_file(checkpoint)
    if isinstance(model, CALMForCausalLM) and weights is not None:
        try:
            check_weights(checkpoint_weights(checkpoint), model.composition, weights)
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



def check_run_dir(run_dir: Path, checkpoints: Path, config: TrainConfig) -> Path | None:
    """The checkpoint a run in `run_dir` resumes from (None: it starts from scratch). A directory that already
    holds a run (its `train_config.json` or checkpoints) is refused unless `config.resume` or `config.overwrite`
    says what to do with it. Reads files only, so it can run before any model is loaded."""
    found = latest_checkpoint(checkpoints)
    if not config.resume and not config.overwrite:
        if found is not None:
            raise ValueError(f"{checkpoints} already holds checkpoints (latest {found.name}): pass resume=True "
                             "(--resume) to continue that run, or overwrite=True (--overwrite) to start over")
        if (run_dir / CONFIG_FILE).is_file():
            raise ValueError(f"{run_dir} already holds a run ({CONFIG_FILE}): choose another output_dir "
                             "(--output-dir), or pass overwrite=True (--overwrite) to replace it")
    return found if config.resume else None


def prepare_run_dir(run_dir: Path, checkpoints: Path, config: TrainConfig, is_main: bool) -> Path | None:
    """Create the run directory, drop half-written checkpoints, and find the checkpoint to resume from
    (`check_run_dir`)."""
    resume_from = check_run_dir(run_dir, checkpoints, config)
    if is_main:
        if config.overwrite and not config.resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(f"{STAGING_PREFIX}*"):  # a save that was interrupted
            shutil.rmtree(stale, ignore_errors=True)
    if config.resume and resume_from is None:
        logger.warning(f"resume=True but {checkpoints} holds no complete checkpoint: starting from scratch")
    return resume_from
