"""Composing models that do not share a tokenizer: the augment reads the anchor's text through its own tokenizer.

The anchor's tokens are turned back into bytes, then into text. That text is cut into *chunks*, and each chunk
is tokenised on its own by the augment's tokenizer. A chunk ends where the next one starts:

- before a run of whitespace that follows a non-space character (a space belongs to the word after it, as in
  byte-level BPE and SentencePiece),
- before punctuation or a symbol that follows a letter, digit or mark (`word.` is `word` + `.`),
- when the chunk reaches `MAX_CHUNK_CHARS` characters (text without spaces, such as Japanese, is cut there).

A chunk is only known to be complete once the first character of the next one has arrived, so its augment tokens
become visible to the anchor position that brought that character, and to every later one. Whatever a position
sees was therefore decided by the text up to it and nothing after it: a full-sequence forward and a forward over
any prefix give the same result (no future leak, training = inference), and the augment's tokens never change
once made, so generation runs the augment incrementally with its own cache. The price is a lag: an anchor
position does not see the word (or the run of up to `MAX_CHUNK_CHARS` characters) that it is still in.

In "stepwise" mode (`augment_mode="stepwise"`) the prompt is cut into chunks as above, but everything after it
(the completion the anchor writes) is cut at the anchor's own token boundaries: each anchor token's text is a
chunk of its own, complete as soon as that token is, so the augment's state after the newest token is visible
at once and the lag goes. The augment then reads the completion as the anchor's tokenizer splits it, not as it
would split the text itself (for English words in byte-level BPE the two mostly agree).

Each augment token's rotary position in the cross-attention is the anchor position whose token brought the
token's last character, so "the augment's reading of this very text" is at offset 0 or just behind.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import unicodedata
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

MAX_CHUNK_CHARS = 32
NEVER = torch.iinfo(torch.long).max  # visible_from of a padding slot: no anchor position sees it
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Fields of a tokenizer.json that change how text becomes ids (not truncation or padding settings).
_ENCODING_FIELDS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor", "decoder")


# ------------------------------------------------------------------------------------ tokenizer identity


def _backend(tokenizer: PreTrainedTokenizerBase, who: str) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{who} must be a fast (Rust-backed) Hugging Face tokenizer, got {type(tokenizer).__name__}: "
                        "load it with AutoTokenizer.from_pretrained(...) (use_fast=True, the default)")
    return backend


# Per tokenizer object, what is slow to work out for a large vocabulary (seconds for Gemma's 262k tokens).
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memo(tokenizer: PreTrainedTokenizerBase, key: str, compute: Callable[[], Any]) -> Any:
    entry = _MEMO.get(tokenizer)
    if entry is None or entry["size"] != len(tokenizer):  # tokens were added since: start again
        entry = _MEMO[tokenizer] = {"size": len(tokenizer)}
    if key not in entry:
        entry[key] = compute()
    return entry[key]


def _spec(tokenizer: PreTrainedTokenizerBase, who: str) -> dict[str, Any]:
    return _memo(tokenizer, "spec", lambda: json.loads(_backend(tokenizer, who).to_str()))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, who: str = "tokenizer") -> str:
    """sha256 of everything that decides how the tokenizer turns text into ids: vocabulary, merges, normaliser,
    pre-tokeniser, post-processor, decoder, added and special tokens. Not its truncation or padding settings,
    nor which token it pads with (`tok.pad_token = tok.eos_token` leaves the same tokenizer)."""
    _backend(tokenizer, who)

    def compute() -> str:
        spec = _spec(tokenizer, who)
        text = json.dumps({key: spec.get(key) for key in _ENCODING_FIELDS}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    return _memo(tokenizer, "fingerprint", compute)


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers turn every text into the same ids (compared by content, not by `vocab_size`)."""
    return tokenizer_fingerprint(a, "tokenizer") == tokenizer_fingerprint(b, "augment_tokenizer")


# ---------------------------------------------------------------------------------------- token -> bytes


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoders(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return [d for inner in spec.get("decoders", [spec]) for d in _decoders(inner)] if spec["type"] == "Sequence" \
        else [spec]


def token_bytes(tokenizer: PreTrainedTokenizerBase, who: str = "tokenizer") -> list[bytes]:
    """The bytes of text each token id stands for (special tokens: none), so that a sequence's text is the
    concatenation of its tokens' bytes even where a token holds part of a multi-byte character."""
    return _memo(tokenizer, "token_bytes", lambda: _token_bytes(tokenizer, who))


def _token_bytes(tokenizer: PreTrainedTokenizerBase, who: str) -> list[bytes]:
    backend = _backend(tokenizer, who)
    decoders = _decoders(_spec(tokenizer, who).get("decoder"))
    kinds = {d["type"] for d in decoders}
    byte_level = _byte_decoder() if "ByteLevel" in kinds else None
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in backend.get_added_tokens_decoder().values()} if hasattr(
        backend, "get_added_tokens_decoder") else set()
    for piece, index in vocab.items():
        if index in special:
            continue
        if piece in added:
            table[index] = piece.encode("utf-8")
        elif byte_level is not None:
            table[index] = bytes(byte_level[c] for c in piece) if all(c in byte_level for c in piece) \
                else piece.encode("utf-8")
        else:
            table[index] = _piece_bytes(piece, decoders)
    return table


def _piece_bytes(piece: str, decoders: list[dict]) -> bytes:
    """A SentencePiece-style piece: `▁` is a space (Replace / Metaspace decoders), `<0xNN>` one raw byte."""
    for d in decoders:
        if d["type"] == "ByteFallback" and (match := _BYTE_TOKEN.match(piece)):
            return bytes([int(match.group(1), 16)])
    for d in decoders:
        if d["type"] == "Replace" and "String" in d["pattern"]:
            piece = piece.replace(d["pattern"]["String"], d["content"])
        elif d["type"] == "Metaspace":
            piece = piece.replace(d.get("replacement", "▁"), " ")
    return piece.encode("utf-8")


# ------------------------------------------------------------------------------------------- chunking


def _is_punct(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def is_chunk_boundary(previous: str, char: str, chunk_length: int) -> bool:
    """Whether a new chunk starts at `char`, given the character before it and the current chunk's length."""
    if chunk_length >= MAX_CHUNK_CHARS:
        return True
    if char.isspace():
        return not previous.isspace()
    if previous.isspace():
        return False
    return _is_punct(char) and not _is_punct(previous)


@dataclass
class Slot:
    """One augment token: its id, its rotary position (an anchor position) and the first anchor column that
    may attend to it."""

    token: int
    position: int
    visible_from: int


@dataclass
class RowAligner:
    """One sequence's alignment state while its anchor tokens arrive one by one (generation keeps one per row)."""

    aligner: TokenizerAligner
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    tail: str = ""  # characters of the chunk not yet complete
    tail_positions: list[int] = field(default_factory=list)  # per tail character: the anchor position it came at
    started: bool = False  # the augment's prefix (its BOS) is out
    chunks: int = 0  # chunks made final so far
    stepwise: bool = False  # past the prompt in "stepwise" mode: every anchor token is a chunk of its own

    def feed(self, token: int, column: int, position: int) -> list[Slot]:
        """The augment tokens that anchor token `token` (at `column`, rotary `position`) makes final."""
        slots = [] if self.started else self.aligner.prefix_slots(column, position)
        self.started = True
        table = self.aligner.anchor_bytes
        text = self.decoder.decode(table[token] if 0 <= token < len(table) else b"")
        if self.stepwise:  # (a token that ends inside a UTF-8 character adds its bytes to the next token's chunk)
            return slots + self._final([(text, [position] * len(text))] if text else [], column)
        chunks: list[tuple[str, list[int]]] = []
        for char in text:
            if self.tail and is_chunk_boundary(self.tail[-1], char, len(self.tail)):
                chunks.append((self.tail, self.tail_positions))
                self.tail, self.tail_positions = "", []
            self.tail += char
            self.tail_positions.append(position)
        return slots + self._final(chunks, column)

    def flush(self, column: int) -> list[Slot]:
        """Make the unfinished chunk final (the text is complete, e.g. at the end of a prompt the augment reads
        on its own); visible from `column` on."""
        chunks = [(self.tail, self.tail_positions)] if self.tail else []
        self.tail, self.tail_positions = "", []
        return self._final(chunks, column)

    def _final(self, chunks: list[tuple[str, list[int]]], column: int) -> list[Slot]:
        slots = self.aligner.chunk_slots(chunks, column, first=self.chunks == 0)
        self.chunks += len(chunks)
        return slots

    def copy(self) -> RowAligner:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate(self.decoder.getstate())
        return RowAligner(self.aligner, decoder, self.tail, list(self.tail_positions), self.started, self.chunks,
                          self.stepwise)


def _reader(tokenizer: PreTrainedTokenizerBase, continuation: bool) -> Tokenizer:
    """A private copy of the augment's tokenizer that reads special-token strings in the text as plain text.
    With `continuation`, it also adds no prefix space (SentencePiece's dummy prefix, byte-level BPE's
    `add_prefix_space`): it reads a chunk that continues a text, which the whole text's tokenisation would not
    have prefixed."""
    spec = json.loads(json.dumps(_spec(tokenizer, "augment_tokenizer")))  # a deep copy
    if continuation:
        spec["normalizer"] = _without_prefix(spec.get("normalizer"))
        spec["pre_tokenizer"] = _without_prefix(spec.get("pre_tokenizer"))
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = True
    return backend


def _without_prefix(step: dict | None) -> dict | None:
    """A normaliser or pre-tokeniser spec with its prefix-space rules turned off."""
    if not step:
        return step
    if step["type"] == "Sequence":
        key = "normalizers" if "normalizers" in step else "pretokenizers"
        step[key] = [s for s in map(_without_prefix, step[key]) if s is not None]
        return step
    if step["type"] == "Prepend":
        return None
    if step["type"] == "Metaspace":
        step["prepend_scheme"], step["add_prefix_space"] = "never", False
    if step["type"] == "ByteLevel":
        step["add_prefix_space"] = False
    return step


class TokenizerAligner:
    """Turns anchor token ids into the augment's token ids over the same text (see the module docstring)."""

    def __init__(self, anchor_tokenizer: PreTrainedTokenizerBase, augment_tokenizer: PreTrainedTokenizerBase) -> None:
        self.anchor_bytes = token_bytes(anchor_tokenizer, "tokenizer")
        # The first chunk of a text is read as a whole text is; the others as its continuation.
        self.readers = {first: _memo(augment_tokenizer, f"reader-{first}",
                                     partial(_reader, augment_tokenizer, not first)) for first in (True, False)}
        # The augment's own leading special tokens (its BOS), read before any text, as it was trained.
        full = augment_tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = augment_tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix = full[: full.index(bare[0])] if bare and bare[0] in full else []
        pad = augment_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (augment_tokenizer.eos_token_id or 0))

    def new_row(self) -> RowAligner:
        return RowAligner(self)

    def prefix_slots(self, column: int, position: int) -> list[Slot]:
        return [Slot(token, position, column) for token in self.prefix]

    def chunk_slots(self, chunks: list[tuple[str, list[int]]], column: int, first: bool = False) -> list[Slot]:
        """Slots of complete chunks, visible from `column`; `first`: `chunks[0]` starts the text."""
        if not chunks:
            return []
        slots = []
        encodings = [] if not first else self.readers[True].encode_batch([chunks[0][0]], add_special_tokens=False)
        encodings += self.readers[False].encode_batch([text for text, _ in chunks[len(encodings):]],
                                                      add_special_tokens=False)
        for (_, positions), encoding in zip(chunks, encodings):
            for token, (_, end) in zip(encoding.ids, encoding.offsets):
                slots.append(Slot(token, positions[min(max(end, 1), len(positions)) - 1], column))
        return slots

    def align(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
              stepwise: bool = False) -> dict[str, torch.Tensor]:
        """Augment inputs for a padded batch of anchor ids (left or right padding), packed as by `pack`.
        `position_ids` default to counting each row's real tokens. With `prompt_lengths` (in columns, per row)
        a row's text ends there, and its last chunk is made final; with `stepwise` too, the row goes on after
        its prompt one anchor token per chunk."""
        state = AlignmentState(self)
        lengths = None if prompt_lengths is None else [int(n) for n in prompt_lengths]
        return state.feed(input_ids, attention_mask, position_ids, 0, lengths, stepwise)

    def pack(self, rows: list[list[Slot]], device: torch.device | str = "cpu", start: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        """Right-padded (B, S) tensors of the rows' slots: `input_ids`, `attention_mask`, `position_ids` (the
        augment's own positions, counted from `start` per row), `key_positions` (the rotary positions in the
        cross-attention) and `visible_from` (the first anchor column that may see the slot)."""
        width = max((len(r) for r in rows), default=0)
        out = {name: torch.full((len(rows), width), fill, dtype=torch.long) for name, fill in (
            ("input_ids", self.pad_id), ("attention_mask", 0), ("position_ids", 0), ("key_positions", 0),
            ("visible_from", NEVER))}
        for b, slots in enumerate(rows):
            if not slots:
                continue
            n = len(slots)
            out["input_ids"][b, :n] = torch.tensor([s.token for s in slots])
            out["attention_mask"][b, :n] = 1
            out["position_ids"][b, :n] = torch.arange(n) + (0 if start is None else int(start[b]))
            out["key_positions"][b, :n] = torch.tensor([s.position for s in slots])
            out["visible_from"][b, :n] = torch.tensor([s.visible_from for s in slots])
        return {name: t.to(device) for name, t in out.items()}


class AlignmentState:
    """The per-row aligners and the augment's slot bookkeeping of a generation cache (one per cross-tokenizer
    augment). Rows are created at the first forward; beam search reorders them with the tensors."""

    def __init__(self, aligner: TokenizerAligner) -> None:
        self.aligner = aligner
        self.rows: list[RowAligner] = []
        self.attention_mask: torch.Tensor | None = None  # (B, S): real slots among everything the augment read
        self.visible_from: torch.Tensor | None = None  # (B, S)
        self.counts: torch.Tensor | None = None  # (B,): real slots so far (the augment's next position)

    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
             past: int, prompt_lengths: list[int] | None = None, stepwise: bool = False) -> dict[str, torch.Tensor]:
        """Feed the new anchor columns `past ... past + T - 1` (padding columns are skipped); return the new
        slots, packed (see `TokenizerAligner.pack`). A row whose `prompt_lengths` entry is reached makes its last
        chunk final and stops there, or, `stepwise`, reads every later anchor token as a chunk of its own."""
        batch, length = input_ids.shape
        if not self.rows:
            self.rows = [self.aligner.new_row() for _ in range(batch)]
            self.counts = torch.zeros(batch, dtype=torch.long)
        ids = input_ids.tolist()
        real = [[True] * length] * batch if attention_mask is None else attention_mask[:, -length:].bool().tolist()
        if position_ids is None:  # as the model counts them: real tokens before, or columns without a mask
            positions = [[past + i for i in range(length)]] * batch if attention_mask is None else \
                (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:].tolist()
        else:
            positions = position_ids.expand(batch, -1).tolist()
        new = []
        for b, row in enumerate(self.rows):
            end = None if prompt_lengths is None else prompt_lengths[b]
            slots = []
            for i in range(length):
                column = past + i
                if end is not None and column >= end and not stepwise:
                    break
                if real[b][i]:
                    slots += row.feed(ids[b][i], column, positions[b][i])
                if end is not None and column == end - 1:
                    slots += row.flush(column)
                    row.stepwise = stepwise
            new.append(slots)
        packed = self.aligner.pack(new, input_ids.device, start=self.counts)
        self.counts = self.counts + packed["attention_mask"].sum(-1).cpu()
        for name in ("attention_mask", "visible_from"):
            old = getattr(self, name)
            setattr(self, name, packed[name] if old is None else torch.cat([old, packed[name]], dim=-1))
        return packed

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) rows by index: beam search's reordering, batch selection and expansion."""
        if not self.rows:
            return
        indices = indices.cpu()
        self.rows = [self.rows[i].copy() for i in indices.tolist()]
        self.counts = self.counts[indices]
        for name in ("attention_mask", "visible_from"):
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(0, indices.to(tensor.device)))
