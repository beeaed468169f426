"""What `calm reproduce` runs: the key-value arithmetic reproduction and its probes, and the translation one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TypeVar

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
