"""The model card (README.md) saved beside a composition: its bases, connections, size, options and data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from .config import OPTIONS

CARD_NAME = "README.md"
# A README.md without this line was written by someone else, and is never overwritten.
MARK = "<!-- Written by calm's save_pretrained, which rewrites it on every save. -->"


def may_write_card(directory: Path) -> bool:
    """Whether README.md in `directory` is absent or one that calm wrote."""
    path = directory / CARD_NAME
    return not path.exists() or (path.is_file() and MARK in path.read_text(errors="replace"))


def _base_name(record: dict[str, Any]) -> str:
    """A base's public name: its Hub id, else the last part of its local path (never a full local path)."""
    if record.get("hub_id"):
        return record["hub_id"]
    name = record.get("local_path") or record.get("name_or_path")
    return f"{Path(name).name} (a local model)" if name else "not recorded"


def _data_line(what: str, summary: dict[str, Any]) -> str:
    facts = [summary[k] for k in ("format",) if summary.get(k)]
    facts += [f"{summary[k]:,d} {k}" for k in ("examples", "tokens") if isinstance(summary.get(k), int)]
    return f"- {what}: {summary.get('source', 'unnamed')}" + (f" ({', '.join(facts)})" if facts else "")


def card_text(config: Any, trainable: int, title: str, tags: Sequence[str] = ()) -> str:
    """README.md for a composition with `config` (its base records already resolved) and `trainable`
    composition parameters; `tags` are added to the Hub metadata."""
    records = [("anchor", config.anchor), *((f"augments[{k}]", r) for k, r in enumerate(config.augments))]
    hub_ids = [r["hub_id"] for _, r in records if r.get("hub_id")]
    metadata = ModelCardData(library_name="calm", pipeline_tag="text-generation",
                             tags=["calm", "composition", *tags], base_model=hub_ids or None)
    rows = [f"| {who} | {_base_name(r)} | {r.get('revision', '')} | {r.get('model_type', '')} | "
            f"{r['num_layers']} | {r['width']} |" for who, r in records]
    connections = [f"- augments[{k}]: " + ", ".join(f"{a} → {b}" for a, b in conns)
                   for k, conns in enumerate(config.connections)]
    options = ", ".join(f"{key}={getattr(config, key)!r}" for key in OPTIONS)
    data = getattr(config, "training_data", None) or {}
    data_lines = [_data_line(what, data[key]) for key, what in (("train", "training data"),
                                                                  ("eval", "evaluation data")) if key in data]
    return "\n".join([
        f"---\n{metadata.to_yaml()}\n---", MARK, f"# {title}", "",
        "A [CALM](https://arxiv.org/abs/2401.02412) composition: a frozen anchor model whose residual stream "
        "reads frozen augmenting models through trainable cross-attention. This repo holds only the composition "
        "layers; the base models are loaded from where they are recorded (`calm_config.json`).", "",
        "| base | model | revision | type | layers | width |", "|---|---|---|---|---|---|", *rows, "",
        "Connections (augment block → anchor block):", *connections, "",
        f"Trainable parameters: {trainable:,d}", "", f"Options: {options}", "",
        *(["Data:", *data_lines, ""] if data_lines else []),
        "```python", "import calm", "",
        f'model = calm.CALMForCausalLM.from_pretrained("{title}")  # loads the base models and tokenizers too',
        "```", "",
    ])
