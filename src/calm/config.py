"""Composition configuration: which layers connect, and how the new layers behave."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

# "identity": a zero output projection, so the composition starts as exactly the anchor. "random": every projection
# keeps PyTorch's default nn.Linear init.
INITS = ("identity", "random")
# Old names of an init, still accepted with a DeprecationWarning. "paper" was renamed "random": the paper does not
# say how its layers are initialised.
DEPRECATED_INITS = {"paper": "random"}
AUGMENT_MODES = ("iterative", "prompt", "stepwise")
# The dtypes the composition layers can be kept in (torch's names). "auto" in `compose` picks the anchor's.
COMPOSITION_DTYPES = ("float32", "bfloat16", "float16")
# The options of a composition besides its connections and base models: what a saved composition, a training
# run's record and `calm train --resume` each carry over. A new `CALMConfig` option goes here, or is lost, and
# makes a new file format version (`calm.formats`).
OPTIONS = ("num_heads", "qk_norm", "value_norm", "init", "augment_mode", "rope_theta", "augment_dropout",
           "augment_norm", "composition_dtype")

# The paper's plain cross-attention layer (arXiv 2401.02412, §3): f_proj a plain linear map of the augment's
# states, then multi-head attention with no position encoding and no normalisation. The paper does not say how
# the layers are initialised; "random" (PyTorch's default init of every projection) adds nothing it does not
# describe. Use it as `calm.compose(anchor, augment, **calm.PAPER_LAYER)` or `calm train --preset paper`.
PAPER_LAYER = {"rope_theta": None, "qk_norm": False, "value_norm": False, "augment_norm": False, "init": "random",
               "augment_dropout": 0.0}
PRESETS = {"paper": PAPER_LAYER}


def resolve_init(init: Any, stacklevel: int = 2) -> Any:
    """`init` under its current name: a deprecated one (`DEPRECATED_INITS`) warns and is mapped."""
    if isinstance(init, str) and init in DEPRECATED_INITS:
        new = DEPRECATED_INITS[init]
        warnings.warn(f"init={init!r} is deprecated: it is now called init={new!r} (PyTorch's default init of "
                      "every projection; the paper does not specify one)", DeprecationWarning,
                      stacklevel=stacklevel + 1)
        return new
    return init


def evenly_spaced(num_layers: int, count: int) -> list[int]:
    """`count` block indices spread evenly over `num_layers` blocks, the last block always included."""
    return [(i + 1) * num_layers // count - 1 for i in range(count)]


def resolve_connections(
    augment_layers: int,
    anchor_layers: int,
    connections: Sequence[Sequence[int]] | None = None,
    num_connections: int | None = None,
    every: int | None = None,
) -> list[tuple[int, int]]:
    """Turn one of the three ways of naming connections into validated `(augment_block, anchor_block)` pairs.

    Block indices are 0-based: `(3, 7)` feeds the output of augment block 3 into the anchor's residual stream
    right after anchor block 7; -1 names the embeddings (the input of block 0) on either side. `every=k` taps
    augment blocks k-1, 2k-1, ... (the paper's "every 4th layer").
    """
    given = [name for name, v in (("connections", connections), ("num_connections", num_connections),
                                  ("every", every)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of connections, num_connections or every (got {', '.join(given)})")
    if connections is None and num_connections is None and every is None:
        # The paper's default: tap every 4th augment layer (fewer taps when a model is too shallow for that).
        if augment_layers >= 4 and augment_layers // 4 <= anchor_layers:
            every = 4
        else:
            num_connections = min(augment_layers, anchor_layers)
    if every is not None:
        _check_count("every", every, augment_layers, "the augment's layer count")
        num_connections = augment_layers // every
        if num_connections > anchor_layers:
            raise ValueError(
                f"every={every} taps {num_connections} augment layers but the anchor has only {anchor_layers}"
            )
        return list(zip([every * (i + 1) - 1 for i in range(num_connections)],
                        evenly_spaced(anchor_layers, num_connections)))
    if connections is None:
        _check_count("num_connections", num_connections, min(augment_layers, anchor_layers),
                     "the smaller of the two models' layer counts")
        return list(zip(evenly_spaced(augment_layers, num_connections),
                        evenly_spaced(anchor_layers, num_connections)))
    return validate_connections(connections, augment_layers, anchor_layers)


def _check_count(name: str, value: Any, upper: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer in [1, {upper}] ({what})")


def validate_connections(
    connections: Sequence[Sequence[int]], augment_layers: int, anchor_layers: int
) -> list[tuple[int, int]]:
    """Check explicit `(augment_block, anchor_block)` pairs; raise `ValueError` naming the bad value."""
    if isinstance(connections, (str, bytes)) or not isinstance(connections, Sequence) or len(connections) == 0:
        raise ValueError(
            f"connections={connections!r} is invalid: expected a non-empty list of (augment, anchor) pairs"
        )
    pairs = []
    for i, pair in enumerate(connections):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"connections[{i}]={pair!r} is invalid: expected a pair (augment_layer, anchor_layer); "
                "both sides need the same number of layers"
            )
        a, b = pair
        for side, value, n in (("augment", a, augment_layers), ("anchor", b, anchor_layers)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"connections[{i}] {side} layer {value!r} is not an integer: expected an integer in [-1, {n - 1}]"
                )
            if not -1 <= value < n:
                raise ValueError(
                    f"connections[{i}] {side} layer {value!r} is out of range: expected an integer in [-1, {n - 1}] "
                    "(-1: the embeddings, before block 0)"
                )
        pairs.append((a, b))
    for i in range(1, len(pairs)):
        if pairs[i][1] <= pairs[i - 1][1]:
            raise ValueError(
                f"connections[{i}] anchor layer {pairs[i][1]} must be greater than the previous one "
                f"({pairs[i - 1][1]}): anchor layers must be strictly increasing"
            )
    return pairs


class CALMConfig(PretrainedConfig):
    """Everything needed to rebuild a composition on top of its base models.

    `connections[k]` lists the `(augment_block, anchor_block)` pairs of augmenting model k. `qk_norm`
    RMS-normalises what the queries and keys read (the anchor's states; f_proj's output), `value_norm` what the
    values read (f_proj's output, through the keys' norm). `composition_dtype` is the dtype of the composition
    layers' weights (torch's name), whatever the bases' dtypes. `anchor` and `augments` record each base model's name
    or path, layer count, width and vocabulary size so a saved composition can find its bases again and refuse
    the wrong ones.
    """

    model_type = "calm"

    def __init__(
        self,
        connections: list[list[list[int]]] | None = None,
        num_heads: int = 4,
        qk_norm: bool = True,
        value_norm: bool = True,
        init: str = "identity",
        augment_mode: str = "iterative",
        rope_theta: float | None = 10000.0,
        augment_dropout: float = 0.0,
        augment_norm: bool | str = True,
        composition_dtype: str = "float32",
        anchor: dict | None = None,
        augments: list[dict] | None = None,
        **kwargs: Any,
    ) -> None:
        # Pairs become lists (JSON's shape); anything malformed is kept as is for validate_structure to name.
        self.connections = [[list(p) if isinstance(p, (list, tuple)) else p for p in conns]
                            if isinstance(conns, (list, tuple)) else conns for conns in (connections or [])]
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.value_norm = value_norm
        self.init = resolve_init(init, stacklevel=2)
        self.augment_mode = augment_mode
        self.rope_theta = rope_theta
        self.augment_dropout = augment_dropout
        self.augment_norm = augment_norm
        self.composition_dtype = composition_dtype
        self.anchor = dict(anchor or {})
        self.augments = [dict(a) for a in (augments or [])]
        kwargs.setdefault("vocab_size", self.anchor.get("vocab_size"))
        kwargs.setdefault("is_encoder_decoder", False)
        super().__init__(**kwargs)
        self.validate_options()

    def validate_options(self) -> None:
        """Raise `ValueError` for an option outside its allowed values."""
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is invalid: expected one of {INITS}")
        if self.augment_mode not in AUGMENT_MODES:
            raise ValueError(f"augment_mode={self.augment_mode!r} is invalid: expected one of {AUGMENT_MODES}")
        for name in ("qk_norm", "value_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False")
        if not (isinstance(self.augment_norm, bool) or self.augment_norm == "block"):
            raise ValueError(f"augment_norm={self.augment_norm!r} is invalid: expected True (unit RMS), False (none) "
                             "or 'block' (the augment's own next-block input norm)")
        if self.composition_dtype not in COMPOSITION_DTYPES:
            raise ValueError(f"composition_dtype={self.composition_dtype!r} is invalid: expected one of "
                             f"{COMPOSITION_DTYPES}")
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads!r} is invalid: expected a positive integer")
        theta = self.rope_theta
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1):
            raise ValueError(f"rope_theta={theta!r} is invalid: expected a number > 1, or None for no rotary "
                             "position encoding in the cross-attention")
        p = self.augment_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"augment_dropout={p!r} is invalid: expected a probability in [0, 1)")
        self.validate_structure()

    def validate_structure(self) -> None:
        """Check the connections against the recorded base models (when recorded): one list of valid
        `(augment_block, anchor_block)` pairs per augment, and `num_heads` dividing the anchor's width. A
        config read from disk can then never point the composition at a block that does not exist."""
        anchor_layers, anchor_width = self.anchor.get("num_layers"), self.anchor.get("width")
        if self.augments and len(self.augments) != len(self.connections):
            raise ValueError(f"connections has {len(self.connections)} lists but there are {len(self.augments)} "
                             "augments: expected one list of (augment_layer, anchor_layer) pairs per augment")
        for k, conns in enumerate(self.connections):
            augment_layers = self.augments[k].get("num_layers") if self.augments else None
            if not isinstance(anchor_layers, int) or not isinstance(augment_layers, int):
                continue  # nothing recorded to check against (e.g. CALMConfig() with no arguments)
            try:
                validate_connections(conns, augment_layers, anchor_layers)
            except ValueError as e:
                where = f"connections of augment {k}: " if len(self.connections) > 1 else ""
                raise ValueError(f"{where}{e}") from None
        if isinstance(anchor_width, int) and anchor_width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the anchor's hidden width {anchor_width}")


def composition_dtype_name(dtype: Any, anchor_dtype: torch.dtype) -> str:
    """The name `CALMConfig.composition_dtype` records for `dtype`: a torch dtype, one of `COMPOSITION_DTYPES`, or
    "auto" (the anchor's dtype: that of its first floating-point weights)."""
    chosen = anchor_dtype if isinstance(dtype, str) and dtype == "auto" else dtype
    name = str(chosen).removeprefix("torch.") if isinstance(chosen, torch.dtype) else chosen
    if name not in COMPOSITION_DTYPES:
        what = f"'auto' (the anchor's dtype, {name})" if chosen is not dtype else repr(dtype)
        raise ValueError(f"composition_dtype={what} is invalid: expected 'auto' or one of {COMPOSITION_DTYPES} (or "
                         "the torch dtype of one)")
    return name
