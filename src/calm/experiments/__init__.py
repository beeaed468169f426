"""What `calm reproduce` runs: the key-value arithmetic and translation reproductions (their probes are in
research/)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TypeVar

import torch

Spec = TypeVar("Spec")


def with_changes(spec: Spec, changes: Sequence[str]) -> Spec:
    """Dataclass `spec` with each `FIELD=JSON` in `changes` applied (`num_heads=32`, `connections=[[-1,-1]]`);
    a `ValueError` names a change that is not of that form."""
    known = {f.name for f in dataclasses.fields(spec)}
    values = {}
    for change in changes:
        name, sep, text = change.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--spec {change!r}: expected FIELD=JSON with FIELD one of {sorted(known)}")
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--spec {change!r}: the value is not JSON ({e.msg})") from None
    return dataclasses.replace(spec, **values)


def matched_lora(model, target_params: int, targets: Sequence[str]):
    """`model` with LoRA on the modules named `targets` (Linear or Embedding), its rank chosen so that its trainable
    parameter count is the closest to `target_params` (each adapted d_in×d_out matrix adds r·(d_in + d_out)).
    Returns (the PEFT model, the rank)."""
    from peft import LoraConfig, get_peft_model

    per_rank = sum(sum(m.weight.shape) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear | torch.nn.Embedding) and name.rsplit(".", 1)[-1] in targets)
    rank = max(1, round(target_params / per_rank))
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                            lora_dropout=0.0)), rank
