"""Key-value arithmetic (CALM paper §4.1), scaled down to fit a laptop CPU.

D_KV maps random lowercase strings ("keys") to unique integers ("values"). One arithmetic expression over
keys gives three tasks, told apart by the prompt's last character:

    KV-Substitution      "abc_+de_-f_:"  -> "10+22-24"   (what m_A is trained on: it memorises D_KV)
    Numeric-Arithmetic   "10+22-24="     -> "+008"       (what m_B is trained on: it never sees a key)
    KV-Arithmetic        "abc_+de_-f_="  -> "+008"       (what neither can do alone; the composition's target)

By default numbers have a fixed width and each key is one token padded to a value's width ('_'), so a key
prompt lines up token for token with its numeric twin (`KVConfig.pad_keys`); the paper's plain format is one
setting away. KV-Substitution and KV-Arithmetic share the same inputs, so they need different terminators
(':' and '=').
Completions are plain strings here; the tokenizer appends the EOS token when a model is trained on them.
Because every model is causal, m_A's states on the keys are the same whether the prompt later ends in ':'
or '=': the composition reads m_A's knowledge at exactly the positions m_A was trained on.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

Example = dict[str, str]  # {"prompt": ..., "completion": ...}

TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
NUMBER_TOKEN_PREFIX = "#"  # '#07' is one token: the value 7 as a whole
KEY_PAD = "_"  # fills a key out to a value's width: 'abc__' lines up with '007'


@dataclass
class KVConfig:
    """Every choice of the key-value arithmetic data; the paper's value is noted where it gives one. The
    measurements behind the choices that are not the paper's are in results/kv_arithmetic/README.md."""

    seed: int = 0
    # D_KV. Values are a permutation of [value_min, value_max], as in the paper. 500 keys put 100 keys in D_C,
    # too many to learn one by one: the composition has to learn one map from m_A's key states to m_B's digits.
    num_keys: int = 500  # paper: 25_000
    key_len_min: int = 2  # paper: 2
    key_len_max: int = 6  # paper: 6
    value_min: int = 1  # paper: 1
    value_max: int = 500  # paper: 25_000; values are unique, so value_max - value_min + 1 >= num_keys
    # Expressions. Two operands: a 4-layer m_B learns three-digit "a±b" in ~3000 steps; "a±b±c" takes longer.
    operands_min: int = 2  # paper: 3
    operands_max: int = 2  # paper: 6
    # Not in the paper: the base models' training expressions also go down to this many operands (one: the
    # expression is the number itself, '07=' -> '+007'). Evaluation keeps [operands_min, operands_max].
    train_operands_min: int = 1
    operators: str = "+-"  # paper: "+-*" (× is written '*'); '*' binds tighter, as usual
    # Not in the paper: write every number with a fixed number of digits ("07+20=" -> "+027"), so digit i
    # of every operand and of the result sits at a fixed offset; the numbers themselves are unchanged.
    # False gives the paper's plain "7+20=27".
    fixed_width_numbers: bool = True
    # Not in the paper: write results' digits least significant first ("+127" -> "+721"), the order in
    # which carries are computed (Lee et al. 2023). Off: in a short trial with signed results it did not
    # speed learning up.
    reversed_results: bool = False
    # Not in the paper: each key is one token of a word-level vocabulary (digits, operators and markers stay
    # single characters). A large LM recalls an entity's attributes at the entity's last token; a 4-block
    # model reading keys letter by letter recalls a value only where it writes it out (research's `kv_probe.py`:
    # a linear probe on its states at a key's last letter finds the value's digits near chance), leaving nothing
    # there to compose. One token per key also lets the key's first slot know which key it is (`pad_keys`).
    # False: keys are spelled letter by letter, as in the paper's SentencePiece vocabulary.
    key_tokens: bool = True
    # Not in the paper, off by default: the vocabulary also has one token per value ('#07'), as BPE
    # vocabularies have a token per small number, and m_B's arithmetic training writes each operand either way
    # (digits or one token, at random), so that a key prompt 'abc+de=' lines up token for token with
    # '#07+#22='. Off: in a trial it slowed m_B's arithmetic down and CALM learnt nothing.
    number_tokens: bool = False
    # Not in the paper: each key is followed by value_width - 1 pad tokens ('_'), so that a key prompt
    # 'abc__+de__=' lines up token for token with its numeric twin '007+020='. m_B finds an operand's digits at
    # fixed offsets; with the keys padded, the composition only has to turn a key's slots into its digits.
    # Needs key_tokens and fixed_width_numbers.
    pad_keys: bool = True
    seen_fraction: float = 0.2  # paper: 0.2 -- D_C only uses keys from this fraction of D_KV
    substitution_marker: str = ":"  # not in the paper (its tasks are separate prompts)
    arithmetic_marker: str = "="  # not in the paper
    # D_C size in expressions, each giving one example per composition task; paper: not stated. With 100
    # seen keys and two operands there are 100*100*2 = 20,000 expressions.
    num_composition_examples: int = 2000
    # Tasks each D_C expression gives. The issue asks for both KV tasks, the paper's §3.2 for arithmetic only.
    # Trained from scratch on both, the composition learns substitution but little arithmetic. `calm reproduce
    # kv-arithmetic --ablations` also trains on the D_C, from scratch and from the composition trained
    # on this one, which keeps its arithmetic and learns substitution (`kv_reproduce`).
    composition_tasks: tuple[str, ...] = ("kv_arithmetic",)
    # Not in the paper: D_C also holds each seen key alone ('abc_=' -> '+007'), this many times. A one-key
    # expression pins a key's digits down directly.
    single_key_examples: int = 5
    # Not in the paper: D_C also holds the Numeric-Arithmetic twin ('007+022=' -> '+0029') of this share of its
    # expressions, so that the composition learns to leave m_B's digits alone.
    numeric_share: float = 0.25
    num_eval: int = 300  # examples per held-out evaluation set; paper: not stated

    def __post_init__(self) -> None:
        if self.value_max - self.value_min + 1 < self.num_keys:
            raise ValueError(f"{self.num_keys} unique values do not fit in [{self.value_min}, {self.value_max}]")
        if not 1 <= self.key_len_min <= self.key_len_max:
            raise ValueError(f"bad key lengths [{self.key_len_min}, {self.key_len_max}]")
        if not 1 <= self.train_operands_min <= self.operands_min <= self.operands_max:
            raise ValueError(f"bad operand counts: need 1 <= train_operands_min ({self.train_operands_min}) <= "
                             f"operands_min ({self.operands_min}) <= operands_max ({self.operands_max})")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")
        if self.pad_keys and not (self.key_tokens and self.fixed_width_numbers):
            raise ValueError("pad_keys=True lines a one-token key up with a fixed-width value: it needs "
                             "key_tokens=True and fixed_width_numbers=True")
        if not 0 <= self.numeric_share <= 1:
            raise ValueError(f"numeric_share must lie in [0, 1], got {self.numeric_share}")
        if unknown := set(self.composition_tasks) - set(TASKS):
            raise ValueError(f"unknown composition tasks {sorted(unknown)}; known: {TASKS}")
        self.composition_tasks = tuple(self.composition_tasks)  # JSON round trips give lists

    @property
    def value_digits(self) -> int:
        """Digits of the largest value: every value's width when numbers have a fixed width."""
        return len(str(self.value_max))

    @classmethod
    def quick(cls) -> KVConfig:
        """A tiny setting for smoke tests: every code path, no accuracy to speak of."""
        return cls(num_keys=40, value_max=60, num_composition_examples=60, num_eval=32)


@dataclass(frozen=True)
class Expression:
    """An expression over keys: `keys[0] ops[0] keys[1] ops[1] ...`."""

    keys: tuple[str, ...]
    ops: tuple[str, ...]

    def render(self, operands: Iterable[str]) -> str:
        operands = list(operands)
        return operands[0] + "".join(op + x for op, x in zip(self.ops, operands[1:]))


def evaluate_numeric(values: list[int], ops: tuple[str, ...]) -> int:
    """Usual precedence: '*' first, then '+' and '-' left to right."""
    terms, signs = [values[0]], [1]
    for op, v in zip(ops, values[1:]):
        if op == "*":
            terms[-1] *= v
        else:
            terms.append(v)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


@dataclass(frozen=True)
class NumberFormat:
    """How values and results are written: plain ("7", "-12") or fixed width ("007", "-0012")."""

    value_width: int = 0  # 0: plain
    result_width: int = 0  # digits after the sign, which is then always written
    reversed_results: bool = False  # digits of results least significant first (the sign stays first)

    @classmethod
    def for_config(cls, cfg: KVConfig) -> NumberFormat:
        if not cfg.fixed_width_numbers:
            return cls(reversed_results=cfg.reversed_results)
        largest = cfg.value_max * cfg.operands_max  # bounds |a ± b ± ...|; products can be larger
        if "*" in cfg.operators:
            largest = max(largest, cfg.value_max**cfg.operands_max)
        return cls(value_width=cfg.value_digits, result_width=len(str(largest)),
                   reversed_results=cfg.reversed_results)

    def value(self, v: int) -> str:
        return str(v).zfill(self.value_width)

    def result(self, r: int) -> str:
        digits = str(abs(r)).zfill(self.result_width)
        sign = "-" if r < 0 else ("+" if self.result_width else "")
        return sign + (digits[::-1] if self.reversed_results else digits)


@dataclass
class KVData:
    """D_KV plus the seen/unseen split of its keys."""

    table: dict[str, int]  # D_KV: key -> value
    seen_keys: list[str]  # the keys D_C may use (paper: 20%)
    unseen_keys: list[str]  # the rest; only ever appear in evaluation of the composed model
    markers: dict[str, str] = field(default_factory=lambda: {"substitution": ":", "arithmetic": "="})
    numbers: NumberFormat = field(default_factory=NumberFormat)
    key_pad: str = ""  # written after every key in a prompt (KVConfig.pad_keys)

    def kv_substitution(self, e: Expression) -> Example:
        return {"prompt": self._keys(e) + self.markers["substitution"], "completion": self._values(e)}

    def numeric_arithmetic(self, e: Expression, as_tokens: Sequence[bool] = ()) -> Example:
        """`as_tokens[i]`: write operand i as one number token ('#07') instead of its digits."""
        operands = [NUMBER_TOKEN_PREFIX * bool(i < len(as_tokens) and as_tokens[i]) + self.numbers.value(self.table[k])
                    for i, k in enumerate(e.keys)]
        return {"prompt": e.render(operands) + self.markers["arithmetic"],
                "completion": self.numbers.result(self.result(e))}

    def kv_arithmetic(self, e: Expression) -> Example:
        return {"prompt": self._keys(e) + self.markers["arithmetic"],
                "completion": self.numbers.result(self.result(e))}

    def _keys(self, e: Expression) -> str:
        return e.render(k + self.key_pad for k in e.keys)

    def _values(self, e: Expression) -> str:
        return e.render(self.numbers.value(self.table[k]) for k in e.keys)

    def result(self, e: Expression) -> int:
        return evaluate_numeric([self.table[k] for k in e.keys], e.ops)

    def example(self, task: str, e: Expression) -> Example:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        return getattr(self, task)(e)

    @property
    def all_keys(self) -> list[str]:
        return self.seen_keys + self.unseen_keys


def evaluate_prompt(prompt: str) -> int:
    """The value of a Numeric-Arithmetic prompt written in digits ('007+020-3=' -> 24)."""
    body = prompt[:-1]
    if not re.fullmatch(r"\d+(?:[+\-*]\d+)*", body):
        raise ValueError(f"not a Numeric-Arithmetic prompt in digits: {prompt!r}")
    return evaluate_numeric([int(v) for v in re.findall(r"\d+", body)], tuple(re.findall(r"[+\-*]", body)))


def change_one_digit(example: Example, rng: random.Random, numbers: NumberFormat) -> tuple[int, Example]:
    """Numeric-Arithmetic `example` with one operand digit, picked at random, changed to another digit: the
    digit's index in the prompt and the changed example, completed with its own result."""
    prompt = example["prompt"]
    i = rng.choice([j for j, c in enumerate(prompt) if c.isdigit()])
    changed = prompt[:i] + rng.choice(string.digits.replace(prompt[i], "")) + prompt[i + 1:]
    return i, {"prompt": changed, "completion": numbers.result(evaluate_prompt(changed))}


def random_keys(rng: random.Random, count: int, len_min: int, len_max: int, avoid: set[str] = frozenset()) -> list[str]:
    """`count` distinct random lowercase keys of length in [len_min, len_max], none of them in `avoid`."""
    capacity = sum(26**n for n in range(len_min, len_max + 1)) - len(avoid)
    if count > capacity:
        raise ValueError(f"cannot draw {count} distinct keys of length {len_min}-{len_max}")
    keys: dict[str, None] = {}  # insertion-ordered set, so the result is reproducible
    while len(keys) < count:
        key = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(len_min, len_max)))
        if key not in avoid:
            keys[key] = None
    return list(keys)


def make_kv_data(cfg: KVConfig, seed: int | None = None, avoid_keys: set[str] = frozenset()) -> KVData:
    """Draw D_KV (keys, unique values) and split its keys into seen and unseen."""
    rng = random.Random(cfg.seed if seed is None else seed)
    keys = random_keys(rng, cfg.num_keys, cfg.key_len_min, cfg.key_len_max, avoid=set(avoid_keys))
    values = rng.sample(range(cfg.value_min, cfg.value_max + 1), cfg.num_keys)
    num_seen = max(1, round(cfg.seen_fraction * cfg.num_keys))
    numbers = NumberFormat.for_config(cfg)
    return KVData(table=dict(zip(keys, values)), seen_keys=keys[:num_seen], unseen_keys=keys[num_seen:],
                  markers=_markers(cfg), numbers=numbers, key_pad=KEY_PAD * (numbers.value_width - 1) * cfg.pad_keys)


def _markers(cfg: KVConfig) -> dict[str, str]:
    return {"substitution": cfg.substitution_marker, "arithmetic": cfg.arithmetic_marker}


def random_expression(rng: random.Random, keys: list[str], cfg: KVConfig, operands_min: int | None = None
                      ) -> Expression:
    n = rng.randint(cfg.operands_min if operands_min is None else operands_min, cfg.operands_max)
    return Expression(keys=tuple(rng.choices(keys, k=n)), ops=tuple(rng.choices(cfg.operators, k=n - 1)))


def distinct_expressions(
    rng: random.Random, keys: list[str], cfg: KVConfig, count: int, exclude: set[Expression] = frozenset()
) -> list[Expression]:
    """`count` distinct expressions over `keys`, none in `exclude` (raises if the space is too small)."""
    space = sum((len(keys) ** n) * (len(cfg.operators) ** (n - 1))
                for n in range(cfg.operands_min, cfg.operands_max + 1))
    if count > space - len(exclude):
        raise ValueError(f"asked for {count} distinct expressions but only {space} exist over {len(keys)} keys")
    chosen: dict[Expression, None] = {}
    while len(chosen) < count:
        e = random_expression(rng, keys, cfg)
        if e not in exclude:
            chosen[e] = None
    return list(chosen)


def numeric_table(cfg: KVConfig) -> KVData:
    """A 'table' mapping each number in [value_min, value_max] to itself, so Numeric-Arithmetic over *any*
    operands in that range uses the same machinery (m_B must learn arithmetic, not D_KV's values)."""
    numbers = [str(v) for v in range(cfg.value_min, cfg.value_max + 1)]
    return KVData(table={s: int(s) for s in numbers}, seen_keys=numbers, unseen_keys=[],
                  markers=_markers(cfg), numbers=NumberFormat.for_config(cfg))


def numeric_vocabulary(cfg: KVConfig) -> list[str]:
    """Every token Numeric-Arithmetic is written with (besides BOS and EOS)."""
    numbers = NumberFormat.for_config(cfg)
    tokens = list(dict.fromkeys(string.digits + "+-" + cfg.operators + cfg.arithmetic_marker))
    if cfg.number_tokens and numbers.value_width:
        tokens += [NUMBER_TOKEN_PREFIX + numbers.value(v) for v in range(cfg.value_min, cfg.value_max + 1)]
    return tokens


@dataclass
class KVSplits:
    """D_C for composition training and the held-out evaluation sets (lists of prompt/completion dicts)."""

    composition_train: list[Example]  # D_C: only seen keys
    eval_sets: dict[str, list[Example]]  # name -> examples; see `make_splits`


def make_splits(cfg: KVConfig, data: KVData) -> KVSplits:
    """Build D_C and the four evaluation sets, with no expression shared between D_C and evaluation.

    - kv_substitution: expressions over all keys (m_A's own task, but combinations it was not trained on)
    - numeric_arithmetic: expressions over any operands in [value_min, value_max] (m_B's own task)
    - kv_arithmetic_seen: keys all from the seen 20%, expression not in D_C
    - kv_arithmetic_unseen: keys all from the other 80% (the paper's headline generalisation test)
    """
    rng = random.Random(cfg.seed + 1)
    d_c = distinct_expressions(rng, data.seen_keys, cfg, cfg.num_composition_examples)
    singles = [Expression(keys=(k,), ops=()) for k in data.seen_keys] * cfg.single_key_examples
    composition_train = [data.example(task, e) for e in d_c + singles for task in cfg.composition_tasks]
    numeric_twins = rng.sample(d_c + singles, round(cfg.numeric_share * len(d_c + singles)))
    composition_train += [data.numeric_arithmetic(e) for e in numeric_twins]
    rng.shuffle(composition_train)
    numbers = numeric_table(cfg)
    eval_sets = {
        "kv_substitution": [data.kv_substitution(e) for e in
                            distinct_expressions(rng, data.all_keys, cfg, cfg.num_eval, exclude=set(d_c))],
        "numeric_arithmetic": [numbers.numeric_arithmetic(e) for e in
                               distinct_expressions(rng, numbers.seen_keys, cfg, cfg.num_eval)],
        "kv_arithmetic_seen": [data.kv_arithmetic(e) for e in
                               distinct_expressions(rng, data.seen_keys, cfg, cfg.num_eval, exclude=set(d_c))],
        "kv_arithmetic_unseen": [data.kv_arithmetic(e) for e in
                                 distinct_expressions(rng, data.unseen_keys, cfg, cfg.num_eval)],
    }
    return KVSplits(composition_train=composition_train, eval_sets=eval_sets)


def example_stream(
    cfg: KVConfig, data: KVData, task: str, seed: int, held_out: Iterable[Example] = ()
) -> Iterator[Example]:
    """Endless fresh training examples of one task over all of `data`'s keys, skipping held-out prompts.

    Sampling fresh expressions (instead of a fixed training set) means the base models learn the rule --
    the values of the keys for m_A, arithmetic for m_B -- rather than a list of expressions.
    """
    rng = random.Random(seed)
    held_out_prompts = {ex["prompt"] for ex in held_out}
    mixed = task == "numeric_arithmetic" and cfg.number_tokens and data.numbers.value_width > 0
    while True:
        e = random_expression(rng, data.all_keys, cfg, operands_min=cfg.train_operands_min)
        if mixed:
            ex = data.numeric_arithmetic(e, as_tokens=[rng.random() < 0.5 for _ in e.keys])
            digits = data.numeric_arithmetic(e)["prompt"]
        else:
            ex = data.example(task, e)
            digits = ex["prompt"]
        if digits not in held_out_prompts:  # a held-out expression stays held out in either writing
            yield ex


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def trie_pattern(words: Iterable[str]) -> str:
    """A regex matching exactly `words`, with their common prefixes shared. The regex engine tries an
    alternation's branches one by one at every position: with a flat alternation of 1,000 keys, tokenizing
    took ~12% of m_B's training step; the trie tokenizes ~4x faster and matches the same strings."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def branch(node: dict) -> str:
        alternatives = [re.escape(char) + branch(child) for char, child in sorted(node.items()) if char]
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 and "" not in node else f"(?:{'|'.join(alternatives)})"
        return body + "?" if "" in node else body

    return branch(trie)


def build_tokenizer(cfg: KVConfig, keys: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """One tokenizer shared by m_A, m_B and the composition.

    Vocabulary: pad/bos/eos/unk, the 26 letters, 10 digits, the operators and both task markers, plus each of
    `keys` as one token when `cfg.key_tokens` (a run of letters that is not a key falls back to its letters).
    Encoding prepends BOS; decoding joins tokens with nothing in between.
    """
    specials = [PAD, BOS, EOS, UNK]
    chars = sorted(set(string.ascii_lowercase + string.digits + "+-*" + cfg.substitution_marker
                       + cfg.arithmetic_marker + KEY_PAD * cfg.pad_keys))
    words = sorted(set(keys) - set(chars)) if cfg.key_tokens else []
    numbers = NumberFormat.for_config(cfg)
    number_tokens = ([NUMBER_TOKEN_PREFIX + numbers.value(v) for v in range(cfg.value_min, cfg.value_max + 1)]
                     if cfg.number_tokens and numbers.value_width else [])
    vocab = {tok: i for i, tok in enumerate(specials + chars + words + number_tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Whole keys (a whole run of letters) and number tokens first, else single characters.
    pattern = "."
    if number_tokens:
        pattern = f"{NUMBER_TOKEN_PREFIX}\\d{{{numbers.value_width}}}|" + pattern
    if words:
        pattern = f"(?<![a-z]){trie_pattern(words)}(?![a-z])|" + pattern
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
