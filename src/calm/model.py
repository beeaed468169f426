"""The composed model m(A⊕B): a frozen anchor whose residual stream receives cross-attention over frozen
augmenting models, as a regular transformers `PreTrainedModel` with `generate()`."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .alignment import TokenizerAligner, same_tokenizer, tokenizer_fingerprint
from .blocks import (
    BaseInfo,
    base_info,
    block_reads_its_mode,
    decoder_blocks,
    decoder_prefix,
    dropout_probabilities,
    next_input_norm,
)
from .cache import CALMCache
from .config import AUGMENT_MODES, CALMConfig, composition_dtype_name, resolve_connections, resolve_init
from .hooks import InjectAfter, InjectBefore, PassState, TapAfter, TapBefore
from .layers import CrossAttention
from .placement import connection_devices, execution_device
from .serialization import load_composition, load_state, save_pretrained


class TokenizerMismatchError(ValueError):
    """The models do not share a tokenizer, and the augment's was not given."""


def _record(info: BaseInfo, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    record = {"name_or_path": str(name), "model_type": model.config.model_type, "num_layers": info.num_layers,
              "width": info.width, "vocab_size": info.vocab_size}
    if tokenizer is not None:
        record["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    return record


class CALMForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen anchor causal LM composed with frozen augmenting causal LMs through trainable cross-attention.

    Build one with `calm.compose(anchor, augment, ...)`; reload a trained one with
    `CALMForCausalLM.from_pretrained(path, anchor=..., augments=[...])`.
    """

    config_class = CALMConfig
    base_model_prefix = "calm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the anchor's blocks (see `_set_gradient_checkpointing`)

    def __init__(self, config: CALMConfig, anchor: PreTrainedModel, augments: Sequence[PreTrainedModel],
                 tokenizer: PreTrainedTokenizerBase | None = None,
                 augment_tokenizers: Sequence[PreTrainedTokenizerBase | None] | None = None) -> None:
        super().__init__(config)
        if len(augments) != len(config.connections):
            raise ValueError(
                f"got {len(augments)} augmenting model(s) but the config has connections for {len(config.connections)}"
            )
        self.tokenizer = tokenizer
        self.augment_tokenizers = list(augment_tokenizers or [None] * len(augments))
        self.aligners = self._aligners(config, tokenizer, self.augment_tokenizers)
        self.anchor = anchor
        self.augments = nn.ModuleList(augments)
        anchor_info = base_info(anchor)
        # Plain tuples: the blocks stay registered only under their own models, never twice in state_dict.
        self._anchor_blocks = tuple(decoder_blocks(anchor))
        self._augment_blocks = tuple(tuple(decoder_blocks(a)) for a in augments)
        # Each connection computes where the anchor block it feeds does (several GPUs under a device_map, or the
        # execution device of an offloaded block); the layer moves what it reads there itself.
        devices = connection_devices(config.connections, [execution_device(b) for b in self._anchor_blocks],
                                     [[execution_device(b) for b in blocks] for blocks in self._augment_blocks])
        dtype = getattr(torch, config.composition_dtype)
        self.composition = nn.ModuleList(
            nn.ModuleList(
                CrossAttention(base_info(augment).width, anchor_info.width, config.num_heads, config.qk_norm,
                               config.init, config.rope_theta, config.augment_dropout, config.augment_norm is True,
                               value_norm=config.value_norm).to(device=device, dtype=dtype)
                for device in conn_devices
            )
            for augment, conn_devices in zip(augments, devices)
        )
        # augment_norm="block": each tapped state is read as the augment's own next block reads it. Pretrained
        # models keep a few massive dimensions in their residual stream (Gemma-3: ~90% of the squared norm);
        # their learned input norms damp them, where a plain RMS norm keeps them and the keys all look alike.
        self._tap_norms = tuple(
            {a: next_input_norm(augment, a) for a, _ in conns} if config.augment_norm == "block" else {}
            for augment, conns in zip(augments, config.connections))
        # Each augment runs as its decoder cut after its deepest tapped block: nothing after it ever runs, and
        # the cut decoder's output is that block's output (the embeddings for tap -1).
        self._deepest = tuple(max(a for a, _ in conns) for conns in config.connections)
        self._augment_prefixes = tuple(decoder_prefix(a, d + 1) for a, d in zip(augments, self._deepest))
        for base in (anchor, *augments):
            base.requires_grad_(False)
            base.eval()
        self.generation_config = self._own_generation_config(anchor, config)
        self.post_init()
        self._state = PassState()
        self._hooks = self._install_hooks()  # last: a constructor that raises leaves no hook behind

    def _install_hooks(self) -> list:
        """The hooks that join the models, installed once, inert outside the composition's own passes: after each
        anchor block with connections (before block 0 for anchor block -1), and at each augment tap above the
        deepest (whose state is the cut decoder's output)."""
        state, hooks = self._state, []
        for b in sorted({b for conns in self.config.connections for _, b in conns}):
            if b >= 0:
                hooks.append(self._anchor_blocks[b].register_forward_hook(InjectAfter(state, b)))
            else:
                hooks.append(self._anchor_blocks[0].register_forward_pre_hook(InjectBefore(state), with_kwargs=True))
        for blocks, conns, deepest in zip(self._augment_blocks, self.config.connections, self._deepest):
            for a in sorted({a for a, _ in conns} - {deepest}):
                hooks.append(blocks[a].register_forward_hook(TapAfter(state, a)) if a >= 0 else
                             blocks[0].register_forward_pre_hook(TapBefore(state), with_kwargs=True))
        return hooks

    def _remove_hooks(self) -> None:
        """Take the composition's hooks off the base models (a load that fails after building the model)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @staticmethod
    def _own_generation_config(anchor: PreTrainedModel, config: CALMConfig) -> GenerationConfig:
        """A copy of the anchor's (changing one never changes the other), with the composition's special token
        ids where the anchor's generation config has none."""
        generation_config = copy.deepcopy(anchor.generation_config)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(generation_config, name, None) is None and getattr(config, name, None) is not None:
                setattr(generation_config, name, getattr(config, name))
        return generation_config

    def get_input_embeddings(self) -> nn.Module:
        """The anchor's token embeddings (what `enable_input_require_grads` and embedding hooks act on)."""
        return self.anchor.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.anchor.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.anchor.get_output_embeddings()

    @staticmethod
    def _aligners(config: CALMConfig, tokenizer, augment_tokenizers) -> list[TokenizerAligner | None]:
        """One aligner per augment whose tokenizer differs from the anchor's (None where they share one)."""
        if len(augment_tokenizers) != len(config.augments or augment_tokenizers):
            raise ValueError(f"got {len(augment_tokenizers)} augment tokenizers for {len(config.augments)} augments")
        aligners = []
        for k, record in enumerate(config.augments or [{}] * len(augment_tokenizers)):
            if record.get("shares_tokenizer", True):
                aligners.append(None)
                continue
            if tokenizer is None or augment_tokenizers[k] is None:
                raise ValueError(f"augments[{k}] has its own tokenizer: pass tokenizer= (the anchor's) and "
                                 "augment_tokenizers= (one per augment) to rebuild the composition")
            aligners.append(TokenizerAligner(tokenizer, augment_tokenizers[k]))
        return aligners

    def _init_weights(self, module: nn.Module) -> None:
        """Composition layers initialise themselves; base models are never re-initialised."""

    def train(self, mode: bool = True) -> CALMForCausalLM:
        """Only the composition layers switch mode; the frozen bases stay in eval mode (no dropout), all but the
        flags of the anchor's checkpointed blocks themselves (see `_set_gradient_checkpointing`)."""
        self.training = mode
        self.composition.train(mode)
        self._set_checkpointed_block_modes()
        return self

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint,
                                    **kwargs: Any) -> None:
        """Activation checkpointing as `gradient_checkpointing_enable()`, `activation_checkpointing_enable()` and
        `TrainingArguments(gradient_checkpointing=True)` turn it on and off (transformers does the rest: its
        arguments, `every_n_layers`, `offload`): of the anchor's blocks, the only ones that keep activations for
        the backward pass (the augments run without gradients)."""
        if enable:
            rates = dropout_probabilities(self.anchor)
            if rates and block_reads_its_mode(self._anchor_blocks[0]):
                raise ValueError(
                    f"activation checkpointing runs the anchor's blocks in training mode, and "
                    f"{type(self._anchor_blocks[0]).__name__} applies dropout itself in training mode ({rates} in "
                    "the anchor's config): the frozen anchor would train with dropout on. Load the anchor with "
                    "those set to 0 to checkpoint it")
        self.anchor._set_gradient_checkpointing(enable, self._state.replaying(gradient_checkpointing_func), **kwargs)
        self._set_checkpointed_block_modes()

    def _set_checkpointed_block_modes(self) -> None:
        # transformers checkpoints a block only while the block module itself is in training mode (its
        # GradientCheckpointingLayer reads its own `training`), and composing leaves the anchor in eval mode. So in
        # training, each checkpointed anchor block's own flag is set, and never its submodules': their dropout
        # layers, and the attention, whose attention dropout reads the attention module's flag, stay in eval mode.
        # The anchor keeps computing the same function; the recompute in the backward pass matches the forward.
        for block in self._anchor_blocks:
            block.training = self.training and getattr(block, "gradient_checkpointing", False)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CALMCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        augment_mode: str | None = None,
        augment_length: int | torch.Tensor | None = None,
        augment_states: list[dict[int, torch.Tensor]] | None = None,
        augment_inputs: list[dict[str, torch.Tensor] | None] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Composed causal-LM forward pass.

        `augment_mode="prompt"` makes the augments read only the prompt: its first `augment_length` positions
        (an int, or a LongTensor of per-example lengths counted in columns), the whole input when not given.
        `augment_mode="stepwise"` reads the whole text, but a cross-tokenizer augment reads what follows the
        prompt (`augment_length`) one anchor token at a time, without the lag of whole words (`calm.alignment`).
        With a `cache`, only the new tokens are passed, as in any transformers model. `augment_states`
        (from `compute_augment_states` on the same input) skips the augments' forward passes. `augment_inputs`
        (from `align`, as the training collator builds them) gives each cross-tokenizer augment its own token ids
        and alignment; they are worked out from `input_ids` when not given. `inputs_embeds` replaces the anchor's
        token embeddings; the augments still read `input_ids`, which must then be given for the same tokens.
        """
        _check_inputs(input_ids, inputs_embeds)
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

        keys_values, masks = self._augment_keys_values(
            input_ids, attention_mask, position_ids, cache, past, mode, augment_length, augment_states, augment_inputs
        )
        with self._state.injecting(self._injections(keys_values, masks), position_ids):
            out = self.anchor(
                input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
                attention_mask=attention_mask, position_ids=position_ids,
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
                             augment_states, augment_inputs):
        """Per augment: the (keys, values) of each connection over every augment position the anchor may attend
        to (None when there is none yet), and the (B, 1, T, S) mask of which ones each anchor position sees."""
        length = input_ids.shape[1]
        shared_ids, shared_mask, shared_positions = input_ids, attention_mask, position_ids
        if mode == "prompt" and isinstance(augment_length, int):
            shared_ids, shared_positions = input_ids[:, :augment_length], position_ids[:, :augment_length]
            shared_mask = None if attention_mask is None else attention_mask[:, :augment_length]
        keys_values, masks, shared_cross_mask = [], [], None
        for k in range(len(self.augments)):
            if self.aligners[k] is not None:
                pairs, mask = self._cross_tokenizer_keys_values(
                    k, input_ids, attention_mask, position_ids, cache, past, mode, augment_length,
                    None if augment_states is None else augment_states[k],
                    None if augment_inputs is None else augment_inputs[k])
            else:
                if mode == "prompt" and past > 0:  # decoding: the prompt's keys/values are all there is
                    pairs = [(layer.keys, layer.values) for layer in cache.projected[k]]
                else:
                    augment_cache = cache.augments[k] if cache is not None and mode != "prompt" else None
                    states = self._given_states(k, augment_states[k], shared_ids.shape[1], length) \
                        if augment_states is not None else self._run_augment(
                            k, shared_ids, shared_mask, shared_positions, augment_cache)
                    pairs = self._project(k, states, shared_positions, cache)
                if shared_cross_mask is None:
                    prompt_length = augment_length if mode == "prompt" else None
                    shared_cross_mask = self._cross_mask(attention_mask, past, length, pairs[0][0].shape[-2],
                                                         prompt_length, input_ids.device)
                mask = shared_cross_mask
            keys_values.append(pairs)
            masks.append(mask)
        return keys_values, masks

    @staticmethod
    def _given_states(k: int, states: dict[int, torch.Tensor], length: int, whole: int) -> dict[int, torch.Tensor]:
        """Precomputed states of augment k, over the `whole` input (as `compute_augment_states` gives them) or
        over just the `length` positions the augment reads, cut to those: the prompt, for an int `augment_length`
        in "prompt" mode. The augment is causal: its states over the prompt do not depend on what follows."""
        have = {h.shape[1] for h in states.values()}
        if len(have) != 1 or not have <= {length, whole}:
            raise ValueError(f"augment_states[{k}] covers {sorted(have)} positions, but the input has {whole} and the "
                             f"augment reads {length}: compute them with compute_augment_states on the same input")
        return {a: h[:, :length] for a, h in states.items()}

    def _project(self, k: int, states: dict[int, torch.Tensor], positions: torch.Tensor,
                 cache: CALMCache | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of augment k's connections (appended to the cache's, when there is a cache)."""
        pairs = []
        for j, (a, _) in enumerate(self.config.connections[k]):
            keys, values = self.composition[k][j].keys_values(states[a], positions)
            if cache is not None:
                keys, values = cache.projected[k][j].update(keys, values)
            pairs.append((keys, values))
        return pairs

    def _cross_tokenizer_keys_values(self, k, input_ids, attention_mask, position_ids, cache, past, mode,
                                     augment_length, states, inputs):
        """Augment k reads the anchor's text through its own tokenizer (see `calm.alignment`): its new tokens are
        those the new anchor tokens make final, and anchor column t sees the ones final by column t."""
        batch, length = input_ids.shape
        prompt_lengths = None
        if mode != "iterative":
            whole = past + length if augment_length is None else augment_length
            prompt_lengths = whole.tolist() if torch.is_tensor(whole) else [int(whole)] * batch
        stepwise = mode == "stepwise"
        if cache is not None:
            alignment = cache.alignments[k]
            new = None if mode == "prompt" and past > 0 else alignment.feed(
                input_ids, attention_mask, position_ids, past, prompt_lengths, stepwise)
            real, visible_from = alignment.attention_mask, alignment.visible_from
        else:
            new = inputs if inputs is not None else self.aligners[k].align(
                input_ids, attention_mask, position_ids, None if prompt_lengths is None
                else torch.tensor(prompt_lengths), stepwise)
            real, visible_from = new["attention_mask"], new["visible_from"]
        if new is not None and new["input_ids"].shape[1] > 0:
            if states is not None and any(h.shape[1] != new["input_ids"].shape[1] for h in states.values()):
                raise ValueError(f"augment_states[{k}] do not cover the {new['input_ids'].shape[1]} tokens augment {k} "
                                 "reads in its own tokenizer: compute them with compute_augment_states(input_ids, "
                                 "attention_mask, augment_inputs=model.align(input_ids, attention_mask, "
                                 "augment_length))")
            if states is None:
                states = self._run_augment(k, new["input_ids"], real, new["position_ids"],
                                           None if cache is None else cache.augments[k])
            pairs = self._project(k, states, new["key_positions"], cache)
        elif cache is not None and cache.projected[k][0].is_initialized:
            pairs = [(layer.keys, layer.values) for layer in cache.projected[k]]
        else:
            return None, None  # no augment token is final yet: nothing to attend to
        columns = torch.arange(past, past + length, device=input_ids.device)
        mask = real.bool()[:, None, None, :] & (visible_from[:, None, None, :] <= columns[None, None, :, None])
        return pairs, mask

    def align(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              augment_length: int | torch.Tensor | None = None, augment_mode: str | None = None,
              ) -> list[dict[str, torch.Tensor] | None]:
        """Per augment, its token ids and alignment for this anchor batch (None for an augment that shares the
        anchor's tokenizer): what a training collator passes as `augment_inputs`. `augment_length` ends each
        row's prompt, as in `forward`: the text ends there ("prompt" mode, and "iterative" when given) or goes
        on one anchor token per chunk ("stepwise"; the config's mode when `augment_mode` is not given)."""
        stepwise = self._augment_mode(augment_mode) == "stepwise"
        lengths = augment_length
        if lengths is None and stepwise:
            lengths = input_ids.shape[1]
        if lengths is not None and not torch.is_tensor(lengths):
            lengths = torch.full((input_ids.shape[0],), int(lengths))
        return [None if aligner is None else aligner.align(input_ids, attention_mask, prompt_lengths=lengths,
                                                           stepwise=stepwise)
                for aligner in self.aligners]

    def compute_augment_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                               augment_inputs: list[dict[str, torch.Tensor] | None] | None = None,
                               ) -> list[dict[int, torch.Tensor]]:
        """Tapped hidden states of every augment (frozen, so they can be computed once and reused). A
        cross-tokenizer augment's states are over its own tokens (`augment_inputs`, or `align`'s)."""
        position_ids = self._position_ids(attention_mask, 0, input_ids.shape[1], input_ids.device)
        if augment_inputs is None:
            augment_inputs = self.align(input_ids, attention_mask)
        states = []
        for k, inputs in enumerate(augment_inputs):
            if inputs is None:
                states.append(self._run_augment(k, input_ids, attention_mask, position_ids, None))
            else:
                states.append(self._run_augment(k, inputs["input_ids"], inputs["attention_mask"],
                                                inputs["position_ids"], None))
        return states

    @torch.no_grad()
    def _run_augment(self, k: int, input_ids, attention_mask, position_ids, cache) -> dict[int, torch.Tensor]:
        """Hidden states after each tapped block of augment k (tap -1: the input of block 0, i.e. the
        embeddings): its decoder runs up to its deepest tapped block, and nothing after it."""
        taps: dict[int, torch.Tensor] = {}
        self._state.taps = taps
        try:
            device = _input_device(self.augments[k])
            out = self._augment_prefixes[k](
                input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                cache=cache, use_cache=cache is not None)
        finally:
            self._state.taps = None
        taps[self._deepest[k]] = out[0]
        norms = self._tap_norms[k]
        return {a: norms[a](h) if a in norms else h for a, h in taps.items()}

    @staticmethod
    def _cross_mask(attention_mask, past, length, num_keys, augment_length, device) -> torch.Tensor | str | None:
        """(B, 1, T, S) True where anchor query t may see augment position s: s <= t, s not padding, and s in
        the prompt when `augment_length` is per example. Without an attention mask the fast SDPA paths serve
        instead: "causal" for a square causal mask, None when every key precedes every query (decoding). With one,
        the mask is always built: asking whether it has padding would wait for the device every pass."""
        per_example = torch.is_tensor(augment_length)
        if not per_example and attention_mask is None:
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

    def _injections(self, keys_values, masks) -> dict[int, list]:
        """Per anchor block, the (layer, keys, values, mask) of each connection whose cross-attention is added to
        the stream after it (anchor block -1: before block 0, onto the embeddings). An augment with nothing to
        attend to yet adds nothing."""
        by_block: dict[int, list] = {}
        for k, conns in enumerate(self.config.connections):
            if keys_values[k] is None:
                continue
            for j, (_, b) in enumerate(conns):
                by_block.setdefault(b, []).append((self.composition[k][j], *keys_values[k][j], masks[k]))
        return by_block

    # --------------------------------------------------------------- generation

    def new_cache(self) -> CALMCache:
        """An empty composite cache for this model."""
        return CALMCache(self.anchor.config, [a.config for a in self.augments], self.config.connections,
                         self.aligners)

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

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> dict:
        """transformers' preparation, except that a first step from `inputs_embeds` keeps the token ids, which the
        augments read."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        embeds = inputs.get("inputs_embeds")
        if embeds is not None and inputs.get("input_ids") is None and input_ids.shape[1] >= embeds.shape[1]:
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - embeds.shape[1]:]
        return inputs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, augment_mode: str | None = None, **kwargs: Any):
        """`transformers` generation; `augment_mode` overrides the config's ("iterative", "prompt" or
        "stepwise")."""
        mode = self._augment_mode(augment_mode)
        if mode != "iterative":
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is None:
                raise ValueError(f"augment_mode={mode!r} needs the prompt as input_ids")
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

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict | None = None, push_to_hub: bool = False,
                        max_shard_size: int | str | None = None, safe_serialization: bool = True,
                        **hub_options: Any) -> Any:
        """Write the composition (never the bases): `calm_config.json`, `config.json`, `model.safetensors` (the
        composition weights under their model names), the tokenizers and a model card (README.md).

        `state_dict` (as the Trainer passes under FSDP/DeepSpeed, where parameters are sharded) supplies the
        full weights; only its `composition.` entries are written. Only the main process writes. `push_to_hub=True`
        then uploads the files to `repo_id` (default: the directory's name), with `commit_message`,
        `commit_description`, `private`, `token`, `create_pr` and `revision` as in transformers. The weights are
        one file: a `max_shard_size` they exceed is refused, as are `safe_serialization=False` and any other
        argument. Returns the Hub commit when pushing."""
        return save_pretrained(self, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                               push_to_hub=push_to_hub, max_shard_size=max_shard_size,
                               safe_serialization=safe_serialization, **hub_options)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = None,
                    tags: Sequence[str] = ()) -> Any:
        """Upload the composition to Hub repo `repo_id` (`save_pretrained` into a temporary directory, then
        push); `tags` are added to the model card's metadata."""
        with tempfile.TemporaryDirectory() as tmp:
            return save_pretrained(self, tmp, push_to_hub=True, repo_id=repo_id, commit_message=commit_message,
                                   commit_description=commit_description, private=private, token=token,
                                   revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, except that a state dict of composition weights alone (`composition.`
        names, as `model.safetensors` holds them, which is what a stock Trainer loads to resume or to restore the
        best model) loads only the composition, checked strictly whatever `strict` says."""
        if state_dict and all(name.startswith("composition.") for name in state_dict):
            return load_state(self, state_dict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, anchor: PreTrainedModel | str | os.PathLike | None = None,
                        augments: Sequence[PreTrainedModel | str | os.PathLike | None] | None = None, *,
                        tokenizer: PreTrainedTokenizerBase | None = None,
                        augment_tokenizers: Sequence[PreTrainedTokenizerBase | None] | None = None,
                        config: CALMConfig | None = None, revision: str | None = None, subfolder: str = "",
                        trust_remote_code: bool = False, **base_kwargs: Any) -> CALMForCausalLM:
        """Load a saved composition, from a local directory or a Hub repo id (at `revision`), with its base models
        and tokenizers: one call is enough.

        Each base model is the one given (`anchor=`, `augments=[...]`: a model, a local directory or a Hub id;
        None for the recorded one) or the one the composition records: the local directory it was loaded from,
        else its Hub id at the recorded commit, loaded with `AutoModelForCausalLM.from_pretrained(...,
        **base_kwargs)`. A base found nowhere raises `FileNotFoundError` naming it and every place tried.
        `cache_dir`, `token`, `local_files_only` and `force_download` apply to every download. Tokenizers saved
        with it are loaded too; given ones must be those it was trained with (compared by fingerprint)."""
        return load_composition(cls, path, anchor, augments, tokenizer=tokenizer,
                                augment_tokenizers=augment_tokenizers, config=config, revision=revision,
                                subfolder=subfolder, trust_remote_code=trust_remote_code, **base_kwargs)


def _input_device(model: PreTrainedModel) -> torch.device:
    """Where `model` reads its token ids: where its embeddings compute (looked up at each call, as the model may
    have been moved since it was composed)."""
    device = execution_device(model.get_input_embeddings())
    return device if isinstance(device, torch.device) else model.device  # an embedding table is one tensor


def _check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    if input_ids is None:
        what = "inputs_embeds without input_ids" if inputs_embeds is not None else "no input_ids"
        raise ValueError(f"got {what}: the augmenting models read the token ids, so input_ids is required "
                         "(inputs_embeds may replace the anchor's embeddings of the same tokens)")
    if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}: they must describe the same (batch, length) tokens")


# `pipeline("text-generation")`, `AutoConfig.for_model("calm")` and the Auto classes know a composition.
AutoConfig.register(CALMConfig.model_type, CALMConfig, exist_ok=True)
AutoModelForCausalLM.register(CALMConfig, CALMForCausalLM, exist_ok=True)


def compose(
    anchor: PreTrainedModel,
    augment: PreTrainedModel | Sequence[PreTrainedModel],
    *,
    connections: Sequence | None = None,
    num_connections: int | None = None,
    every: int | None = None,
    num_heads: int | None = None,
    qk_norm: bool = True,
    value_norm: bool = True,
    init: str = "identity",
    augment_mode: str = "iterative",
    rope_theta: float | None = 10000.0,
    augment_dropout: float = 0.0,
    augment_norm: bool | str = True,
    composition_dtype: torch.dtype | str = "float32",
    tokenizer: PreTrainedTokenizerBase | None = None,
    augment_tokenizer: PreTrainedTokenizerBase | None = None,
    augment_tokenizers: Sequence[PreTrainedTokenizerBase | None] | None = None,
) -> CALMForCausalLM:
    """Compose a frozen anchor with one or more frozen augmenting causal LMs.

    Name the connections one way: `connections=[(augment_block, anchor_block), ...]` (a list of such lists
    with several augments), `num_connections=n` (evenly spaced on both models) or `every=k` (every k-th
    augment block, the paper's choice). With none, every 4th augment block is tapped. `num_heads` defaults to
    the anchor's attention heads. `augment_norm` sets how f_proj reads the augment's states: True scales each to
    unit RMS, "block" reads them through the augment's own next-block input norm (for pretrained augments with
    massive activations), False leaves them as they are. `qk_norm` RMS-normalises what the queries and keys
    read, `value_norm` what the values read (f_proj's output, through the keys' norm). `init="identity"` zeroes
    each output projection, so the composition starts as exactly the anchor; "random" keeps PyTorch's default
    init. `**calm.PAPER_LAYER` gives the paper's plain layer (no rotary positions, no norms, random init).
    `augment_mode` is what the augments read: "iterative" (the paper's: every token), "prompt" (the prompt only) or
    "stepwise" (every token; a different-tokenizer augment reads the completion one anchor token at a time).
    `composition_dtype` is the dtype of the composition layers' weights, whatever the bases' (float32 by default;
    "auto": the anchor's, e.g. bfloat16 for fused attention kernels on GPUs).

    Place the bases first (`.to(device)`, or `device_map=...` when loading them): each connection is put on the
    device its anchor block computes on, and a placement that cannot work (a block never loaded, on "meta" with
    no offload hook) raises `ValueError` here.

    Models need not share a tokenizer: pass the anchor's `tokenizer` and the augment's `augment_tokenizer`
    (`augment_tokenizers=[...]` with several augments). An augment whose tokenizer is the anchor's (compared by
    content) reads the anchor's tokens directly; any other reads the same text through its own tokenizer (see
    `calm.alignment`). Without tokenizers, the models must have the same vocabulary size and are assumed to share
    a tokenizer.
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
    augment_tokenizers = _augment_tokenizers(augment_tokenizer, augment_tokenizers, len(augments))
    shares = [_shares_tokenizer(i, anchor_info, info, tokenizer, tok, _special_ids(anchor), _special_ids(a))
              for i, (info, tok, a) in enumerate(zip(infos, augment_tokenizers, augments))]
    per_augment = _split_connections(connections, len(augments))
    resolved = [
        resolve_connections(info.num_layers, anchor_info.num_layers, conns, num_connections, every)
        for info, conns in zip(infos, per_augment)
    ]
    heads = anchor_info.num_heads if num_heads is None else num_heads
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and anchor_info.width % heads:
        raise ValueError(f"num_heads={heads} must divide the anchor's hidden width {anchor_info.width}")
    config = CALMConfig(
        connections=[[list(p) for p in r] for r in resolved], num_heads=heads, qk_norm=qk_norm,
        value_norm=value_norm, init=resolve_init(init),
        augment_mode=augment_mode, rope_theta=rope_theta, augment_dropout=augment_dropout,
        augment_norm=augment_norm, composition_dtype=composition_dtype_name(composition_dtype, anchor.dtype),
        anchor=_record(anchor_info, anchor, tokenizer),
        augments=[_record(info, a, tok) | {"shares_tokenizer": shared}
                  for info, a, tok, shared in zip(infos, augments, augment_tokenizers, shares)],
        pad_token_id=anchor.config.pad_token_id, eos_token_id=anchor.config.eos_token_id,
        bos_token_id=anchor.config.bos_token_id,
    )
    return CALMForCausalLM(config, anchor, augments, tokenizer, augment_tokenizers)


def _augment_tokenizers(one: Any, many: Any, num_augments: int) -> list:
    if one is not None and many is not None:
        raise ValueError("give augment_tokenizer (one augment) or augment_tokenizers (a list), not both")
    if one is not None:
        if num_augments != 1:
            raise ValueError(f"augment_tokenizer is for one augment, but there are {num_augments}: pass "
                             "augment_tokenizers=[...] with one tokenizer (or None) per augment")
        return [one]
    if many is None:
        return [None] * num_augments
    if isinstance(many, PreTrainedTokenizerBase) or len(many) != num_augments:
        raise ValueError(f"augment_tokenizers must be a list of {num_augments} tokenizer(s) (or None), one per "
                         f"augment, got {many!r:.80}")
    return list(many)


def _special_ids(model: PreTrainedModel) -> dict[str, int]:
    config = model.config.get_text_config(decoder=True)
    ids = {name: getattr(config, f"{name}_token_id", None) for name in ("bos", "eos")}
    return {name: value for name, value in ids.items() if isinstance(value, int)}


def _shares_tokenizer(i: int, anchor: BaseInfo, augment: BaseInfo, tokenizer: Any, augment_tokenizer: Any,
                      anchor_ids: dict[str, int], augment_ids: dict[str, int]) -> bool:
    """Whether augment i reads the anchor's token ids directly; raise when that cannot be decided or done."""
    if augment_tokenizer is None:
        differ = [f"{name}_token_id {augment_ids[name]} against {anchor_ids[name]}"
                  for name in sorted(anchor_ids.keys() & augment_ids.keys()) if anchor_ids[name] != augment_ids[name]]
        if augment.vocab_size != anchor.vocab_size or differ:
            what = ", ".join(differ) if augment.vocab_size == anchor.vocab_size else \
                f"vocab_size {augment.vocab_size} but the anchor has {anchor.vocab_size}"
            raise TokenizerMismatchError(
                f"augment[{i}] has {what}: the models do not share a tokenizer; pass the anchor's tokenizer= and "
                "the augment's augment_tokenizer= (augment_tokenizers=[...] with several augments)"
            )
        return True
    if tokenizer is None:
        raise ValueError("augment_tokenizer is given but tokenizer is not: pass the anchor's tokenizer too")
    if not same_tokenizer(tokenizer, augment_tokenizer):
        return False
    if len(tokenizer) > augment.vocab_size:
        raise ValueError(f"augment[{i}] shares the anchor's tokenizer ({len(tokenizer)} tokens) but its embedding "
                         f"matrix has only {augment.vocab_size} rows")
    return True


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
