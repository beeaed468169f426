"""`CompositionTrainer`: `transformers.Trainer` plus what composition training needs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..data import PROMPT_COMPLETION, TokenizedDataset
from ..eval import exact_match_count
from ..model import CALMForCausalLM
from ..serialization import WEIGHTS_NAME, load_checked, weights_file
from .augment_cache import AugmentStateCache
from .checkpoints import (
    STAGING_PREFIX,
    CheckpointError,
    checkpoint_weights,
    latest_checkpoint,
    publish_directory,
    write_data_state,
)
from .nan_guard import NonFiniteGuard


class CompositionTrainer(Trainer):
    """`transformers.Trainer` plus the augment-state cache, exact-match evaluation, throughput logging and
    atomic, composition-aware checkpoints. Works for any causal LM; the CALM-specific parts switch off."""

    def __init__(self, *args: Any, augment_cache: AugmentStateCache | None = None, exact_match: bool = True,
                 exact_match_mode: str = "stripped", max_new_tokens: int = 0, max_exact_match_examples: int = 0,
                 on_nan: str = "stop", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.augment_cache = augment_cache
        self.exact_match = exact_match
        self.exact_match_mode = exact_match_mode  # `calm.eval.is_exact_match`'s `match`
        self.max_new_tokens = max_new_tokens
        self.max_exact_match_examples = max_exact_match_examples
        self.nan_guard = NonFiniteGuard(self, on_nan)
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
        augments read only the prompt in "prompt" mode, and the completion token by token in "stepwise") and
        cached augment states."""
        inputs = dict(inputs)
        indices = inputs.pop("example_index", None)
        augment_length = inputs.pop("augment_length", None)
        calm = self.calm_model
        if calm is not None:
            if calm.config.augment_mode != "iterative" and augment_length is not None:
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
        self.nan_guard.check_loss(loss)
        return loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, its steps guarded against NaN/inf (`NonFiniteGuard`)."""
        return self.nan_guard.guard(super().create_optimizer(model))

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
        """Fraction of examples whose greedy completion is the reference (`calm.eval.is_exact_match` in mode
        `exact_match_mode`). Under DDP each process takes a share; a sharded model (FSDP, DeepSpeed) needs every
        process in every forward, so there all of them generate the same batches in lockstep (`synced_gpus`)."""
        tokenizer = self.processing_class
        completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
        max_new_tokens = self.max_new_tokens or 1 + max(len(ids) for ids in completions)  # + EOS
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        share = examples if sharded else examples[self.args.process_index :: self.args.world_size]
        sync = {"synced_gpus": True} if sharded else {}
        correct = exact_match_count(self.accelerator.unwrap_model(self.model), tokenizer, share, max_new_tokens,
                                    self.args.per_device_eval_batch_size, match=self.exact_match_mode, **sync)
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
            if self.state.best_global_step:  # the Trainer saw only the staging directory: name the published one
                self.state.best_model_checkpoint = str(run_dir / f"{PREFIX_CHECKPOINT_DIR}-"
                                                                 f"{self.state.best_global_step}")
            self.accelerator.wait_for_everyone()  # every process has written its RNG state
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
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
        """A composition checkpoint's weights are checked against the checksum its calm_config.json records
        before they are loaded; other models load the Trainer's way."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, CALMForCausalLM) and not self.is_fsdp_enabled and not self.is_deepspeed_enabled:
            checkpoint = Path(resume_from_checkpoint)
            weights = checkpoint_weights(checkpoint)  # safetensors only: nothing is unpickled
            load_checked(target.composition, weights, weights_file(checkpoint) or checkpoint / WEIGHTS_NAME)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """The best checkpoint's composition weights, checked as when resuming; other models the Trainer's way."""
        target = self.accelerator.unwrap_model(self.model)
        if isinstance(target, CALMForCausalLM) and not self.is_fsdp_enabled and not self.is_deepspeed_enabled:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
            return
        super()._load_best_model()
