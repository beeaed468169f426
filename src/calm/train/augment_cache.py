"""The cache of the frozen augments' tapped states: computed in the first epoch, reused in every later one, so
that the augments never run again."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments

from .options import TrainConfig


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



def new_augment_cache(config: TrainConfig, args: TrainingArguments) -> AugmentStateCache:
    """An empty augment-state cache; on disk, whatever an earlier run left there is removed first (it may
    belong to other data or other models)."""
    directory = Path(config.augment_cache_dir) if config.augment_cache_dir else None
    with args.main_process_first(local=False, desc="clearing the augment-state cache"):
        if directory is not None and args.process_index == 0:
            shutil.rmtree(directory, ignore_errors=True)
        return AugmentStateCache(directory, writer=f"rank{args.process_index}")
