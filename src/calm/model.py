"""The composed model m(A⊕B): a frozen anchor whose residual stream receives cross-attention over frozen
augmenting models, as a regular transformers `PreTrainedModel` with `generate()`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .blocks import BaseInfo, base_info, decoder_blocks
from .cache import CALMCache
from .config import AUGMENT_MODES, CALMConfig, resolve_connections
from .layers import CrossAttention


class _StopAugment(Exception):
    """Raised after an augment's deepest tapped block: its later blocks, norm and LM head are never run."""


def _block_output(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if torch.is_tensor(output) else (hidden, *output[1:])


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _record(info: BaseInfo, model: PreTrainedModel) -> dict:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return {"name_or_path": str(name), "model_type": model.config.model_type, "num_layers": info.num_layers,
            "width": info.width, "vocab_size": info.vocab_size}


class CALMForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen anchor causal LM composed with frozen augmenting causal LMs through trainable cross-attention.

    Build one with `calm.compose(anchor, augment, ...)`; reload a trained one with
    `CALMForCausalLM.from_pretrained(path, anchor=..., augments=[...])`.
    """

    config_class = CALMConfig
    base_model_prefix = "calm"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: CALMConfig, anchor: PreTrainedModel, augments: Sequence[PreTrainedModel]) -> None:
        super().__init__(config)
        if len(augments) != len(config.connections):
            raise ValueError(
                f"got {len(augments)} augmenting model(s) but the config has connections for {len(config.connections)}"
            )
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        anchor_info = base_info(anchor)
        device = next(anchor.parameters()).device
        self.composition = nn.ModuleList(
            nn.ModuleList(
                CrossAttention(base_info(augment).width, anchor_info.width, config.num_heads, config.qk_norm,
                               config.init, config.rope_theta, config.augment_dropout, config.augment_norm)
                for _ in conns
            )
            for augment, conns in zip(augments, config.connections)
        ).to(device=device, dtype=torch.float32)
        # Plain tuples: the blocks stay registered only under their own models, never twice in state_dict.
        self._anchor_blocks = tuple(decoder_blocks(anchor))
        self._augment_blocks = tuple(tuple(decoder_blocks(a)) for a in augments)
        for base in (anchor, *augments):
            base.requires_grad_(False)
            base.eval()
        self.generation_config = anchor.generation_config
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Composition layers initialise themselves; base models are never re-initialised."""

    def train(self, mode: bool = True) -> CALMForCausalLM:
        """Only the composition layers switch mode; the frozen bases stay in eval mode (no dropout)."""
        self.training = mode
        self.composition.train(mode)
        return self

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CALMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        augment_mode: str | None = None,
        augment_length: int | torch.Tensor | None = None,
        augment_states: list[dict[int, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Composed causal-LM forward pass.

        `augment_mode="prompt"` makes the augments read only the prompt: its first `augment_length` positions
        (an int, or a LongTensor of per-example lengths counted in columns), the whole input when not given.
        With a `cache`, only the new tokens are passed, as in any transformers model. `augment_states`
        (from `compute_augment_states` on the same input) skips the augments' forward passes.
        """
        if "past_key_values" in kwargs:  # deprecated alias of `cache` in transformers 5
            cache = cache if cache is not None else kwargs.pop("past_key_values")
        mode = self._augment_mode(augment_mode)
        use_cache = cache is not None if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, CALMCache):
            raise ValueError(
                f"cache must be a CALMCache (from model.new_cache()), got {type(cache).__name__}: the composed "
                "model keeps one cache per base model plus the projected augment keys/values"
            )
        past = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past, length, input_ids.device)

        keys_values = self._augment_keys_values(
            input_ids, attention_mask, position_ids, cache, past, mode, augment_length, augment_states
        )
        num_keys = keys_values[0][0][0].shape[-2]
        prompt_length = augment_length if mode == "prompt" else None
        mask = self._cross_mask(attention_mask, past, length, num_keys, prompt_length, input_ids.device)
        with self._inject(keys_values, mask, position_ids):
            out = self.anchor(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache.anchor if cache is not None else None, use_cache=use_cache, labels=labels,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, cache=cache,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def _augment_mode(self, augment_mode: str | None) -> str:
        mode = self.config.augment_mode if augment_mode is None else augment_mode
        if mode not in AUGMENT_MODES:
            raise ValueError(f"augment_mode={mode!r} is invalid: expected one of {AUGMENT_MODES}")
        return mode

    @staticmethod
    def _position_ids(attention_mask: torch.Tensor | None, past: int, length: int,
                      device: torch.device) -> torch.LongTensor:
        # Counting real tokens makes a left-padded example see the same positions as when it is alone.
        if attention_mask is None:
            return torch.arange(past, past + length, device=device).unsqueeze(0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -length:]

    def _augment_keys_values(self, input_ids, attention_mask, position_ids, cache, past, mode, augment_length,
                             augment_states):
        """Per augment, per connection: (keys, values) over every augment position the anchor may attend to."""
        if mode == "prompt" and past > 0:  # decoding: the prompt's keys/values are all there is
            return [[(layer.keys, layer.values) for layer in conns] for conns in cache.projected]
        if mode == "prompt" and isinstance(augment_length, int):
            input_ids, position_ids = input_ids[:, :augment_length], position_ids[:, :augment_length]
            attention_mask = None if attention_mask is None else attention_mask[:, :augment_length]
        result = []
        for k, conns in enumerate(self.config.connections):
            augment_cache = cache.augments[k] if cache is not None and mode == "iterative" else None
            if augment_states is not None:
                states = augment_states[k]
            else:
                states = self._run_augment(k, input_ids, attention_mask, position_ids, augment_cache)
            pairs = []
            for j, (a, _) in enumerate(conns):
                keys, values = self.composition[k][j].keys_values(states[a], position_ids)
                if cache is not None:
                    keys, values = cache.projected[k][j].update(keys, values)
                pairs.append((keys, values))
            result.append(pairs)
        return result

    def compute_augment_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
                               ) -> list[dict[int, torch.Tensor]]:
        """Tapped hidden states of every augment (frozen, so they can be computed once and reused)."""
        position_ids = self._position_ids(attention_mask, 0, input_ids.shape[1], input_ids.device)
        return [self._run_augment(k, input_ids, attention_mask, position_ids, None) for k in range(len(self.augments))]

    @torch.no_grad()
    def _run_augment(self, k: int, input_ids, attention_mask, position_ids, cache) -> dict[int, torch.Tensor]:
        """Hidden states after each tapped block of augment k (tap -1: the input of block 0, i.e. the
        embeddings), stopping after the deepest one."""
        taps = sorted({a for a, _ in self.config.connections[k]})
        blocks = self._augment_blocks[k]
        states: dict[int, torch.Tensor] = {}

        def capture(index: int):
            def hook(module, args, output):
                states[index] = _block_output(output)
                if index == taps[-1]:
                    raise _StopAugment
            return hook

        def capture_input(module, args, kwargs):
            states[-1] = _block_input(args, kwargs)
            if taps[-1] == -1:
                raise _StopAugment

        handles = [blocks[i].register_forward_hook(capture(i)) for i in taps if i >= 0]
        if taps[0] == -1:
            handles.append(blocks[0].register_forward_pre_hook(capture_input, with_kwargs=True))
        try:
            self.augments[k](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=cache is not None)
        except _StopAugment:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return states

    @staticmethod
    def _cross_mask(attention_mask, past, length, num_keys, augment_length, device) -> torch.Tensor | str | None:
        """(B, 1, T, S) True where anchor query t may see augment position s: s <= t, s not padding, and s in
        the prompt when `augment_length` is per example. Without padding the fast SDPA paths serve instead:
        "causal" for a square causal mask, None when every key precedes every query (decoding)."""
        per_example = torch.is_tensor(augment_length)
        if not per_example and (attention_mask is None or bool(attention_mask.all())):
            if num_keys <= past + 1:
                return None
            if past == 0 and num_keys == length:
                return "causal"
        query_pos = torch.arange(past, past + length, device=device)
        key_pos = torch.arange(num_keys, device=device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :num_keys].bool()
        if per_example:
            mask = mask & (key_pos < augment_length.to(device)[:, None])[:, None, None, :]
        return mask

    @contextlib.contextmanager
    def _inject(self, keys_values, mask, position_ids) -> Iterator[None]:
        """Add each connection's cross-attention output to the anchor stream after its anchor block (anchor
        block -1: before block 0, onto the embeddings)."""
        by_block: dict[int, list] = {}
        for k, conns in enumerate(self.config.connections):
            for j, (_, b) in enumerate(conns):
                by_block.setdefault(b, []).append((self.composition[k][j], *keys_values[k][j]))

        def updated(hidden, entries):
            return hidden + sum(layer(hidden, keys, values, mask, position_ids) for layer, keys, values in entries)

        def inject(entries):
            def hook(module, args, output):
                return _replace_block_output(output, updated(_block_output(output), entries))
            return hook

        def inject_input(entries):
            def hook(module, args, kwargs):
                return _replace_block_input(args, kwargs, updated(_block_input(args, kwargs), entries))
            return hook

        handles = [self._anchor_blocks[b].register_forward_hook(inject(e)) for b, e in by_block.items() if b >= 0]
        if -1 in by_block:
            handles.append(self._anchor_blocks[0].register_forward_pre_hook(inject_input(by_block[-1]),
                                                                            with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --------------------------------------------------------------- generation

    def new_cache(self) -> CALMCache:
        """An empty composite cache for this model."""
        return CALMCache(self.anchor.config, [a.config for a in self.augments], self.config.connections)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        user_cache = model_kwargs.get("cache")
        if user_cache is None and "past_key_values" in model_kwargs:
            user_cache = model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        if user_cache is not None:
            if not isinstance(user_cache, CALMCache):
                raise ValueError(f"cache must be a CALMCache (model.new_cache()), got {type(user_cache).__name__}")
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise NotImplementedError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by composed "
                "models: only the dynamic cache (the default) is"
            )
        model_kwargs["cache"] = self.new_cache()

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, augment_mode: str | None = None, **kwargs: Any):
        """`transformers` generation; `augment_mode` overrides the config's ("iterative" or "prompt")."""
        mode = self._augment_mode(augment_mode)
        if mode == "prompt":
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is None:
                raise ValueError("augment_mode='prompt' needs the prompt as input_ids")
            kwargs["augment_length"] = prompt.shape[1]
        return super().generate(inputs, augment_mode=mode, **kwargs)

    # ------------------------------------------------------------ conveniences

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def save_pretrained(self, save_directory: str, state_dict: dict | None = None, **kwargs: Any) -> None:
        """Write `calm_config.json` and `calm.safetensors` (composition weights only, never the bases).

        `state_dict` (as the Trainer passes under FSDP/DeepSpeed, where parameters are sharded) supplies the
        full weights; only its `composition.` entries are written."""
        from .io import save_composition

        prefix = "composition."
        weights = None if state_dict is None else {
            k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        save_composition(self, save_directory, weights)

    @classmethod
    def from_pretrained(cls, path: str, anchor: PreTrainedModel | None = None,
                        augments: Sequence[PreTrainedModel] | None = None, *, trust_remote_code: bool = False,
                        **base_kwargs: Any) -> CALMForCausalLM:
        """Load a saved composition onto its base models: the given ones, or those named in its config
        (loaded with `AutoModelForCausalLM.from_pretrained(name, **base_kwargs)`)."""
        from .io import load_composition

        return load_composition(cls, path, anchor, augments, trust_remote_code=trust_remote_code, **base_kwargs)


def compose(
    anchor: PreTrainedModel,
    augment: PreTrainedModel | Sequence[PreTrainedModel],
    *,
    connections: Sequence | None = None,
    num_connections: int | None = None,
    every: int | None = None,
    num_heads: int | None = None,
    qk_norm: bool = True,
    init: str = "identity",
    augment_mode: str = "iterative",
    rope_theta: float | None = 10000.0,
    augment_dropout: float = 0.0,
    augment_norm: bool = True,
) -> CALMForCausalLM:
    """Compose a frozen anchor with one or more frozen augmenting causal LMs.

    Name the connections one way: `connections=[(augment_block, anchor_block), ...]` (a list of such lists
    with several augments), `num_connections=n` (evenly spaced on both models) or `every=k` (every k-th
    augment block, the paper's choice). With none, every 4th augment block is tapped. `num_heads` defaults to
    the anchor's attention heads.
    """
    if augment is None:
        raise ValueError("augment is None: give an augmenting model (a PreTrainedModel) or a list of them")
    augments = [augment] if isinstance(augment, PreTrainedModel) else list(augment)
    if not augments:
        raise ValueError("augment is an empty list: give at least one augmenting model")
    for i, model in enumerate([anchor, *augments]):
        if not isinstance(model, PreTrainedModel):
            what = "anchor" if i == 0 else f"augment[{i - 1}]"
            raise TypeError(f"{what} must be a transformers PreTrainedModel, got {type(model).__name__}")
    anchor_info = base_info(anchor)
    infos = [base_info(a) for a in augments]
    for i, info in enumerate(infos):
        if info.vocab_size != anchor_info.vocab_size:
            raise ValueError(
                f"augment[{i}] has vocab_size {info.vocab_size} but the anchor has {anchor_info.vocab_size}: "
                "composed models must share one tokenizer (as in the paper)"
            )
    per_augment = _split_connections(connections, len(augments))
    resolved = [
        resolve_connections(info.num_layers, anchor_info.num_layers, conns, num_connections, every)
        for info, conns in zip(infos, per_augment)
    ]
    heads = anchor_info.num_heads if num_heads is None else num_heads
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and anchor_info.width % heads:
        raise ValueError(f"num_heads={heads} must divide the anchor's hidden width {anchor_info.width}")
    config = CALMConfig(
        connections=[[list(p) for p in r] for r in resolved], num_heads=heads, qk_norm=qk_norm, init=init,
        augment_mode=augment_mode, rope_theta=rope_theta, augment_dropout=augment_dropout,
        augment_norm=augment_norm,
        anchor=_record(anchor_info, anchor),
        augments=[_record(info, a) for info, a in zip(infos, augments)],
        pad_token_id=anchor.config.pad_token_id, eos_token_id=anchor.config.eos_token_id,
        bos_token_id=anchor.config.bos_token_id,
    )
    return CALMForCausalLM(config, anchor, augments)


def _split_connections(connections: Sequence | None, num_augments: int) -> list:
    """Explicit connections per augment: a flat list of pairs is allowed when there is one augment."""
    if connections is None:
        return [None] * num_augments
    nested = len(connections) > 0 and all(
        isinstance(c, (list, tuple)) and len(c) > 0 and isinstance(c[0], (list, tuple)) for c in connections
    )
    if not nested:
        if num_augments != 1:
            raise ValueError(
                f"with {num_augments} augments, connections must be a list of {num_augments} lists of "
                "(augment_layer, anchor_layer) pairs"
            )
        return [connections]
    if len(connections) != num_augments:
        raise ValueError(f"connections has {len(connections)} lists but there are {num_augments} augments")
    return list(connections)
