"""The hooks that join a composition's models: installed once on the base models' blocks when the composition is
built, they act only during the composition's own passes, through the `PassState` those passes fill."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def block_output(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if torch.is_tensor(output) else (hidden, *output[1:])


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def replace_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


class PassState:
    """What a composition's hooks read and write during one of its passes: `inject`, per anchor block, the
    cross-attention layers with their keys, values and mask, and `positions`, the anchor's position ids (while the
    anchor runs); `taps`, the augment states captured so far (while an augment runs). All None between passes, so
    the hooks leave the base models alone when they run on their own.

    The hooks hold this object, never the composition: a deep copy of a base model copies just this."""

    def __init__(self) -> None:
        self.inject: dict[int, list] | None = None
        self.positions: torch.Tensor | None = None
        self.taps: dict[int, torch.Tensor] | None = None

    @contextlib.contextmanager
    def injecting(self, inject: dict[int, list] | None, positions: torch.Tensor | None) -> Iterator[None]:
        before = self.inject, self.positions
        self.inject, self.positions = inject, positions
        try:
            yield
        finally:
            self.inject, self.positions = before

    def replaying(self, checkpoint: Callable) -> Callable:
        """`checkpoint` (a `torch.utils.checkpoint.checkpoint`) whose function sees, also when the backward pass
        recomputes it long after its pass ended, the injection of the pass that first ran it. Needed where the
        hooks run inside the checkpoint: transformers 5.20, for one, checkpoints a block's `__call__`, hooks
        included (later versions checkpoint its `forward` and leave the hooks outside)."""
        def run(function: Callable, *args: Any, **kwargs: Any) -> Any:
            inject, positions = self.inject, self.positions

            def replay(*a: Any, **kw: Any) -> Any:
                with self.injecting(inject, positions):
                    return function(*a, **kw)
            return checkpoint(replay, *args, **kwargs)
        return run

    def updated(self, hidden: torch.Tensor, block: int) -> torch.Tensor | None:
        """The anchor stream after anchor block `block` plus its connections' updates; None when it has none."""
        entries = None if self.inject is None else self.inject.get(block)
        if not entries:
            return None
        return hidden + sum(layer(hidden, keys, values, mask, self.positions) for layer, keys, values, mask in entries)


class InjectAfter:
    """Forward hook of an anchor block: adds its connections' cross-attention to the block's output."""

    def __init__(self, state: PassState, block: int) -> None:
        self.state, self.block = state, block

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = self.state.updated(block_output(output), self.block)
        return None if hidden is None else replace_block_output(output, hidden)


class InjectBefore:
    """Forward pre-hook (with kwargs) of anchor block 0: connections to anchor block -1 update its input."""

    def __init__(self, state: PassState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = self.state.updated(block_input(args, kwargs), -1)
        return None if hidden is None else replace_block_input(args, kwargs, hidden)


class TapAfter:
    """Forward hook of an augment block: keeps its output while the composition runs the augment."""

    def __init__(self, state: PassState, block: int) -> None:
        self.state, self.block = state, block

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.state.taps is not None:
            self.state.taps[self.block] = block_output(output)


class TapBefore:
    """Forward pre-hook (with kwargs) of augment block 0: keeps its input, the embeddings (tap -1)."""

    def __init__(self, state: PassState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.state.taps is not None:
            self.state.taps[-1] = block_input(args, kwargs)
