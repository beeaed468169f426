"""Every ```python block in README.md and docs/*.md runs as written.

The blocks of one file run in order, in one namespace: a block may use what an earlier block of the same page
defined, as a reader following the page would. Each file starts from a fresh namespace, in a fresh temporary
working directory (which is also `tempfile`'s directory), so nothing is written into the repository.

A block that cannot run here (a client of a server on a fixed port, a script that reads its command line) is
preceded by an HTML comment `<!-- not-tested: REASON -->`. `OPT_OUTS` lists every such block; a new opt-out,
or one that disappears, fails `test_opt_outs_are_the_listed_ones` until the list is updated. Nothing is skipped.

The README's quick start and docs/cross-tokenizer.md load the packaged real models (the `real` extra), as
`tests/test_real_models.py` does. To keep this test fast, `calm.packaged.load_tokenizer` returns the same
object for the same arguments across pages: composing with Gemma-3's 262k-token tokenizer prepares it once per
tokenizer object, which takes seconds.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import calm.packaged

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
OPT_OUT = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->\s*$")

# (page, first line of code) of every block that carries a not-tested comment.
OPT_OUTS = {
    ("docs/hardware.md", "from transformers import BitsAndBytesConfig"),
    ("docs/serving.md", "from openai import OpenAI"),
    ("docs/training.md", "# bench_train.py: run as `python bench_train.py tiny` or `python bench_train.py small`"),
}


_TOKENIZERS: dict[tuple, object] = {}
_load_tokenizer = calm.packaged.load_tokenizer


def shared_tokenizer(name: str, **kwargs):
    """`calm.packaged.load_tokenizer`, one object per (name, arguments) for the whole test session."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(name, **kwargs)
    return _TOKENIZERS[key]


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the first line of code, 1-based
    code: str
    opt_out: str | None  # the not-tested reason, if any


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, in order (fenced blocks of other languages are passed over)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks, info = opening["indent"], opening["ticks"], opening["info"].strip()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(ticks) and lines[end].strip().strip("`") == ""):
            end += 1
        if info.split()[:1] == ["python"]:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            opt_out = OPT_OUT.match(before)
            body = [line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1 : end]]
            blocks.append(Block(str(path.relative_to(ROOT)), i + 2, "\n".join(body) + "\n",
                                opt_out["reason"] if opt_out else None))
        i = end + 1
    return blocks


def test_pages_have_python_blocks():
    """The parser finds the blocks (an empty result would make the test below pass vacuously)."""
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) >= 2 and "calm.compose(" in readme[0].code
    assert sum(len(python_blocks(page)) for page in PAGES) >= 8


def test_opt_outs_are_the_listed_ones():
    found = {(b.page, b.code.splitlines()[0]) for page in PAGES for b in python_blocks(page) if b.opt_out is not None}
    assert found == OPT_OUTS
    for page in PAGES:
        for block in python_blocks(page):
            assert block.opt_out is None or len(block.opt_out) > 10, f"{block.page}:{block.line}: give a reason"
    # Every not-tested comment sits right before a python block (a stray one would opt out nothing).
    comments = sum(bool(OPT_OUT.match(line)) for page in PAGES for line in page.read_text().splitlines())
    assert comments == len(OPT_OUTS)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.opt_out is None for b in python_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(calm.packaged, "load_tokenizer", shared_tokenizer)
    repository_before = sorted(ROOT.iterdir())
    namespace = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if block.opt_out is not None:
            continue
        code = compile(block.code, f"{block.page}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the python block at {block.page}:{block.line} failed: "
                                 f"{type(e).__name__}: {e}") from e
    assert sorted(ROOT.iterdir()) == repository_before, "a block wrote into the repository"


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", [*PAGES, ROOT / "results" / "kv_arithmetic" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    text, inside = [], None
    for line in page.read_text(encoding="utf-8").splitlines():  # links in prose only, not in code
        fence = FENCE.match(line)
        if fence and (inside is None or line.strip().strip("`") == ""):
            inside = None if inside else fence["ticks"]
        elif inside is None:
            text.append(re.sub(r"`[^`]*`", "", line))
    broken = []
    for target in LINK.findall("\n".join(text)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"
