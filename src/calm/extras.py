"""The optional packages some commands need, and the extra of calm-compose that installs each."""

from __future__ import annotations

import importlib.util

EXTRAS = {"peft": "reproduce", "matplotlib": "reproduce"}


def missing(*modules: str, needed_by: str, extra: str | None = None) -> str | None:
    """None when every one of `modules` is installed, else what to tell the user: which are missing, for what,
    and the extra that installs them (`extra`, or each module's own)."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extras = extra or ",".join(dict.fromkeys(EXTRAS[m] for m in absent))
    return f"{needed_by} needs {', '.join(absent)}, which is not installed: pip install 'calm-compose[{extras}]'"


def require(*modules: str, needed_by: str) -> None:
    """Raise `ImportError` with `missing`'s message when any of `modules` is not installed."""
    if message := missing(*modules, needed_by=needed_by):
        raise ImportError(message)
