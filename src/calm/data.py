"""Training data for compositions: prompt/completion pairs, plain text or chats, tokenised with the anchor's
tokenizer.

Three record formats, one per dataset (JSONL file, `datasets.Dataset` or list of dicts):

    {"prompt": "abc+de=", "completion": "17"}    loss on the completion (and its EOS) only
    {"text": "any document"}                     loss on every token
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
                                                 rendered with the tokenizer's chat template; loss on the
                                                 assistant turns (each with its end-of-turn tokens) only

Tokenisation follows the usual causal-LM recipe: the prompt is encoded with the tokenizer's special tokens
(its BOS, when it has one), the completion without, then EOS is appended. Completions are encoded on their
own, exactly as the prompt is encoded at generation time, so exact-match evaluation sees the training prefix.
A chat is rendered once; the text before each assistant turn (up to and including the template's generation
prompt) and each turn itself are encoded on their own in the same way, with no special tokens added (the
template writes them). Batches are padded per batch, to the longest example in it (right padding for training).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

PROMPT_COMPLETION = "prompt_completion"
TEXT = "text"
CHAT = "chat"
LOSS_ON = ("auto", "completion", "all")
IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)

_KEYS = {PROMPT_COMPLETION: ("prompt", "completion"), TEXT: ("text",), CHAT: ("messages",)}


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says where (file and line, or row) and why."""


class TruncationWarning(UserWarning):
    """Some examples were longer than `max_length` and were cut (the warning says how many)."""


@dataclass
class ExampleSet:
    """Validated raw examples, all of one format, and where they came from (for messages)."""

    examples: list[dict[str, Any]]
    format: str  # PROMPT_COMPLETION, TEXT or CHAT
    source: str
    locations: list[str] = field(default_factory=list)  # per example: "file:line" or "examples row i"

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, index: int) -> str:
        """Where example `index` came from, for messages."""
        return self.locations[index] if index < len(self.locations) else f"{self.source} example {index}"


DataSource = str | os.PathLike | Sequence[Mapping[str, Any]] | ExampleSet | Any  # Any: a datasets.Dataset


# ---------------------------------------------------------------------------------------------- reading


def load_examples(source: DataSource | Sequence[str | os.PathLike]) -> ExampleSet:
    """Read and validate a dataset: a JSONL path, a list of JSONL paths, a `datasets.Dataset`, or a list of
    dicts. Raises `DataError` (a `ValueError`) naming the file and line (or row) of the first bad record, and
    for an empty dataset; `FileNotFoundError` for a missing file. Nothing is tokenised here."""
    if isinstance(source, ExampleSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _check_all(_read_jsonl(Path(source)), str(source))
    if _is_path_list(source):
        sets = [load_examples(path) for path in source]
        formats = {s.format for s in sets}
        if len(formats) > 1:
            raise DataError(f"{', '.join(s.source for s in sets)}: files mix formats {sorted(formats)}")
        examples = [example for s in sets for example in s.examples]
        locations = [where for s in sets for where in s.locations]
        return ExampleSet(examples, sets[0].format, ", ".join(s.source for s in sets), locations)
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError("training data must be a JSONL path, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")
    name = "dataset" if hasattr(source, "column_names") else "examples"
    return _check_all(((f"{name} row {i}", row) for i, row in enumerate(source)), name)


def _is_path_list(source: Any) -> bool:
    return (isinstance(source, (list, tuple)) and len(source) > 0
            and all(isinstance(p, (str, os.PathLike)) for p in source))


def _read_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, parsed record) per non-blank line; strict decoding so that bad UTF-8 is caught."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file (expected a JSONL file, one JSON object per line)")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is not data
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts to complete, from a file: JSONL records with a non-empty string "prompt" (a `.jsonl` file), else one
    prompt per non-blank line. Raises `DataError` naming the line of a bad record, and for a file with none."""
    path = Path(path)
    if path.suffix == ".jsonl":
        prompts = []
        for where, record in _read_jsonl(path):
            prompt = record.get("prompt") if isinstance(record, Mapping) else None
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{where}: expected an object with a non-empty string 'prompt'")
            prompts.append(prompt)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such prompts file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return prompts


def _check_all(records: Iterable[tuple[str, Any]], source: str) -> ExampleSet:
    examples: list[dict[str, Any]] = []
    locations: list[str] = []
    first_format, first_where = None, ""
    for where, record in records:
        fmt = _record_format(record, where)
        if first_format is None:
            first_format, first_where = fmt, where
        elif fmt != first_format:
            raise DataError(f"{where}: a {fmt!r} record, but {first_where} is {first_format!r}: "
                            "a dataset holds one format")
        examples.append({key: record[key] for key in _KEYS[fmt]})
        locations.append(where)
    if not examples:
        raise DataError(f"{source}: no examples (the dataset is empty)")
    return ExampleSet(examples, first_format, source, locations)


def _record_format(record: Any, where: str) -> str:
    """The record's format after checking its keys and values."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_pair = "prompt" in record or "completion" in record
    found = [name for name, present in (("'text'", "text" in record), ("'prompt'/'completion'", has_pair),
                                        ("'messages'", "messages" in record)) if present]
    if len(found) > 1:
        raise DataError(f"{where}: has both {found[0]} and {found[1]}: use one format")
    if not found:
        raise DataError(f"{where}: expected keys 'prompt' and 'completion', 'text', or 'messages'; "
                        f"got {sorted(record)}")
    if "messages" in record:
        _check_messages(record["messages"], where)
        return CHAT
    fmt = PROMPT_COMPLETION if has_pair else TEXT
    for key in _KEYS[fmt]:
        if key not in record:
            raise DataError(f"{where}: missing key {key!r} (a prompt/completion record needs both)")
        _check_string(record[key], f"{where}: {key!r}")
    return fmt


def _check_string(value: Any, what: str, empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise DataError(f"{what} is an empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. an unpaired "\ud800" escape in the JSON
        raise DataError(f"{what} is not valid Unicode (character {e.start}: {e.reason})") from None


def _check_messages(messages: Any, where: str) -> None:
    """A chat: a non-empty list of {"role", "content"} objects with at least one assistant turn to learn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
        _check_string(message["role"], f"{where}: messages[{i}].role")
        _check_string(message["content"], f"{where}: messages[{i}].content", empty=message["role"] != "assistant")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no 'assistant' message: a chat needs an assistant turn to learn from")


# ------------------------------------------------------------------------------------------ tokenising


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids and labels per example, unpadded; `rows[i]["index"]` is the row's position in this dataset
    (the augment-state cache keys on it) and `examples` are the raw strings (exact-match needs them)."""

    rows: list[dict[str, Any]]
    examples: ExampleSet
    num_truncated: int = 0
    num_dropped: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    _fingerprint: str = field(default="", repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def format(self) -> str:
        return self.examples.format

    def fingerprint(self) -> str:
        """A hash of every row's tokens and labels: tells whether a resumed run sees the same data."""
        if not self._fingerprint:
            digest = hashlib.sha256()
            for row in self.rows:
                numbers = [len(row["input_ids"]), *row["input_ids"], *row["labels"]]
                digest.update(array("q", numbers).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def resolve_loss_on(loss_on: str, fmt: str) -> str:
    """'completion' or 'all' for this data format ('auto': the completion of prompt/completion data, the assistant
    turns of chats, every token of text)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r} is invalid: expected one of {LOSS_ON}")
    if loss_on == "auto":
        return "all" if fmt == TEXT else "completion"
    if loss_on == "completion" and fmt == TEXT:
        raise DataError("loss_on='completion' needs prompt/completion data, but this dataset is plain 'text'")
    return loss_on


def tokenize(data: DataSource, tokenizer: PreTrainedTokenizerBase, max_length: int, loss_on: str = "auto",
             append_eos: bool = True, strict_length: bool = False) -> TokenizedDataset:
    """Tokenise (and validate, when not done yet) a dataset. Examples longer than `max_length` are cut at the
    end, with one `TruncationWarning` giving the count; examples left with no target token are dropped.
    With `strict_length=True` an example longer than `max_length` is a `DataError` naming it instead."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r} is invalid: expected a positive integer")
    examples = load_examples(data)
    loss_on = resolve_loss_on(loss_on, examples.format)
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    encoded = (_encode_chats(tokenizer, examples, loss_on) if examples.format == CHAT
               else _encode_pairs(tokenizer, examples, loss_on, eos))
    if strict_length:
        _refuse_long_examples(examples, [len(ids) for ids, _, _ in encoded], max_length)
    rows, truncated, dropped = [], 0, 0
    for index, (input_ids, labels, augment_length) in enumerate(encoded):
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        # The label at position 0 is never predicted (the loss shifts by one), so it does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": input_ids, "labels": labels, "augment_length": min(augment_length, len(input_ids)),
                     "index": len(rows), "source_index": index})
    if truncated:
        cut = f"; {dropped} had no target token left and were dropped" if dropped else ""
        warnings.warn(f"{examples.source}: {truncated} of {len(examples)} examples were longer than "
                      f"max_length={max_length} tokens and were truncated{cut}", TruncationWarning,
                      stacklevel=2)
    if not rows:
        raise DataError(f"{examples.source}: no example has a token to train on (max_length={max_length})")
    lengths = [len(r["input_ids"]) for r in rows]
    stats = {"examples": len(rows), "tokens": sum(lengths), "max_length": max(lengths)}
    return TokenizedDataset(rows, examples, truncated, dropped, stats)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


# input_ids, labels, augment_length: the prompt's length (what "prompt" mode's augments read; where "stepwise" mode
# starts reading one anchor token at a time)
Encoded = tuple[list[int], list[int], int]


def _encode_pairs(tokenizer: PreTrainedTokenizerBase, examples: ExampleSet, loss_on: str,
                  eos: list[int]) -> list[Encoded]:
    """Prompt/completion or text examples; plain text counts as all prompt for the augments."""
    if examples.format == PROMPT_COMPLETION:
        prompts = _encode(tokenizer, [e["prompt"] for e in examples.examples], special=True)
        targets = _encode(tokenizer, [e["completion"] for e in examples.examples], special=False)
    else:
        targets = _encode(tokenizer, [e["text"] for e in examples.examples], special=True)
        prompts = [[] for _ in targets]
    encoded = []
    for prompt, target in zip(prompts, targets):
        labels = ([IGNORE_INDEX] * len(prompt) if loss_on == "completion" else prompt) + target + eos
        is_pair = examples.format == PROMPT_COMPLETION
        encoded.append((prompt + target + eos, labels, len(prompt) if is_pair else len(labels)))
    return encoded


def _encode_chats(tokenizer: PreTrainedTokenizerBase, examples: ExampleSet, loss_on: str) -> list[Encoded]:
    """Chats through the tokenizer's chat template; the augments' "prompt" is everything before the first
    assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{examples.source}: chat ('messages') data needs a tokenizer with a chat template, and "
                        f"{getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} has none (set "
                        "tokenizer.chat_template, or use prompt/completion data)")
    encoded = []
    for index, example in enumerate(examples.examples):
        ids, labels, first_turn = [], [], None
        for text, is_turn in _chat_segments(tokenizer, example["messages"], examples.where(index)):
            piece = _encode(tokenizer, [text], special=False)[0]
            if is_turn and first_turn is None:
                first_turn = len(ids)
            ids += piece
            labels += piece if is_turn or loss_on == "all" else [IGNORE_INDEX] * len(piece)
        encoded.append((ids, labels, len(ids) if first_turn is None else first_turn))
    return encoded


def _chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                   where: str) -> list[tuple[str, bool]]:
    """The rendered chat cut into (text, is an assistant turn) pieces. A turn spans from the end of the text the
    template renders for the chat before it with the generation prompt, to the end of the chat rendered through
    it: the turn's content and its end-of-turn tokens."""
    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as e:  # a template's own error (jinja raise_exception), e.g. roles out of order
            raise DataError(f"{where}: the chat template cannot render this chat: {e}") from None

    full = render(len(messages), False)
    segments, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (done <= len(before) <= len(through) and full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this chat's turns one after another "
                            f"(messages[{i}]): the assistant turns cannot be told apart")
        segments += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    segments.append((full[done:], False))
    return [(text, is_turn) for text, is_turn in segments if text]


def _refuse_long_examples(examples: ExampleSet, lengths: list[int], max_length: int) -> None:
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if long:
        first = long[0]
        raise DataError(f"{examples.where(first)}: {lengths[first]} tokens, longer than max_length={max_length} "
                        f"({len(long)} of {len(examples)} examples are; strict_length refuses them: raise "
                        "max_length, shorten the data, or allow truncation)")


def check_token_ids(dataset: TokenizedDataset, vocab_size: int, pad_id: int | None = None) -> None:
    """Raise `DataError` when a token id (or the padding id) is outside the model's vocabulary: the tokenizer
    does not belong to the model, and the embedding lookup would fail in the middle of training."""
    if pad_id is not None and not 0 <= pad_id < vocab_size:
        raise DataError(f"the padding token id {pad_id} is outside the model's vocabulary (vocab_size="
                        f"{vocab_size}): the tokenizer does not fit the model")
    for row in dataset.rows:
        ids = row["input_ids"]
        if ids and (max(ids) >= vocab_size or min(ids) < 0):  # builtins: fast on millions of rows
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            where = dataset.examples.where(row.get("source_index", row.get("index", 0)))
            raise DataError(f"{where}: token id {bad} is outside the model's vocabulary (vocab_size={vocab_size}): "
                            "the tokenizer does not fit the model")


def model_configs(model: Any) -> list[Any]:
    """The configs of the models a batch goes through: a composition's anchor and augments, else the model's."""
    if hasattr(model, "anchor") and hasattr(model, "augments"):
        return [model.anchor.config, *(augment.config for augment in model.augments)]
    config = getattr(model, "config", None)
    return [config] if config is not None else []


def context_length(configs: Sequence[Any]) -> int | None:
    """The longest sequence every one of these model configs accepts (`max_position_embeddings`, the smallest
    one), or None when none of them says."""
    limits = []
    for config in configs:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            limits.append(limit)
    return min(limits, default=None)


# -------------------------------------------------------------------------------------------- batching


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (padding is masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.LongTensor:
    """Stack variable-length sequences into a (B, longest) tensor, padding with `value` on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not len(seq):
            continue
        start = 0 if side == "right" else width - len(seq)
        out[i, start : start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


@dataclass
class PaddingCollator:
    """Pads a list of `TokenizedDataset` rows to the longest one: input_ids, attention_mask, labels (-100 on
    padding), plus `example_index` and `augment_length`, which the trainer takes out before the forward.

    With `aligners` (a composition's, one per augment, None where an augment shares the anchor's tokenizer),
    it also builds `augment_inputs`: each other augment's own token ids and alignment, so that this work happens
    in the data loader rather than in the forward pass. `augment_mode="prompt"` ends each row's text at its
    prompt, and "stepwise" reads what follows it one anchor token at a time, as the model does."""

    pad_token_id: int
    padding_side: str = "right"
    aligners: Sequence[Any] | None = None
    augment_mode: str = "iterative"

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        batch = {
            "input_ids": pad(ids, self.pad_token_id, self.padding_side),
            "attention_mask": pad([[1] * len(i) for i in ids], 0, self.padding_side),
            "labels": pad([r["labels"] for r in rows], IGNORE_INDEX, self.padding_side),
            "example_index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
            "augment_length": torch.tensor([r["augment_length"] for r in rows], dtype=torch.long),
        }
        if self.aligners is not None and any(a is not None for a in self.aligners):
            prompt_lengths = None
            if self.augment_mode != "iterative":  # in columns, as the model counts them
                offsets = batch["input_ids"].shape[1] - torch.tensor([len(i) for i in ids])
                prompt_lengths = batch["augment_length"] + (offsets if self.padding_side == "left" else 0)
            batch["augment_inputs"] = [
                None if aligner is None else aligner.align(batch["input_ids"], batch["attention_mask"],
                                                           prompt_lengths=prompt_lengths,
                                                           stepwise=self.augment_mode == "stepwise")
                for aligner in self.aligners]
        return batch


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation, encoded exactly like the training prompts."""
    ids = _encode(tokenizer, list(prompts), special=True)
    return {"input_ids": pad(ids, pad_token_id(tokenizer), "left"),
            "attention_mask": pad([[1] * len(i) for i in ids], 0, "left")}
