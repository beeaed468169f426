"""Draw docs/images/cross_tokenizer_alignment.png: which augment tokens each anchor position sees.

Anchor: SmolLM2's byte-level BPE; augment: Gemma-3's SentencePiece BPE (both from the packaged GGUF models, see
tests/tokenizer_support.py). Run from anywhere:

    .venv/bin/python docs/images/make_cross_tokenizer_figure.py

It also prints the worked example's tables (Markdown) that docs/cross-tokenizer.md shows.
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from tokenizer_support import real_tokenizer  # noqa: E402

from calm.alignment import TokenizerAligner, is_chunk_boundary, token_bytes  # noqa: E402

TEXT = "The cat sat on the mat. 猫がマットに座った。"
OUT = Path(__file__).with_name("cross_tokenizer_alignment.png")
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "IPAGothic", "WenQuanYi Micro Hei", "Droid Sans Fallback")


def cjk_font() -> str | None:
    """A font with Japanese glyphs, or None. Fonts installed after matplotlib built its font cache are added."""
    names = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in names for name in CJK_FONTS):
        for path in font_manager.findSystemFonts():
            if any(key in Path(path).name for key in ("CJK", "ipag", "wqy", "DroidSansFallback")):
                font_manager.fontManager.addfont(path)
        names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def show(text: str, cjk: bool) -> str:
    """A token's text for a label: spaces as ␣, and (without a CJK font) non-ASCII characters escaped."""
    text = text.replace(" ", "␣").replace("\n", "\\n")
    return text if cjk else "".join(c if ord(c) < 128 or c in "␣▁" else f"\\u{ord(c):04x}" for c in text)


def main() -> None:
    anchor_tok = real_tokenizer("smollm2-135m-instruct")
    augment_tok = real_tokenizer("gemma-3-270m")
    aligner = TokenizerAligner(anchor_tok, augment_tok)
    ids = anchor_tok(TEXT, return_tensors="pt")["input_ids"]
    out = aligner.align(ids)
    augment_ids = out["input_ids"][0].tolist()
    visible_from = out["visible_from"][0].tolist()
    key_positions = out["key_positions"][0].tolist()

    # What each anchor token adds to the text (a multi-byte character appears at the token that completes it).
    table = token_bytes(anchor_tok)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    anchor_rows = []
    for token in ids[0].tolist():
        raw = table[token]
        anchor_rows.append((token, raw, decoder.decode(raw)))

    # The chunks, cut by the rule of calm.alignment (a chunk is complete when the next one's first character
    # arrives), each with the anchor position that completes it.
    chunks, tail = [], ""
    for t, (_, _, added) in enumerate(anchor_rows):
        for char in added:
            if tail and is_chunk_boundary(tail[-1], char, len(tail)):
                chunks.append((tail, t))
                tail = ""
            tail += char
    pending = tail  # the last chunk: not complete yet (no character follows it)

    # Check the chunks against the aligner's output: each complete chunk, tokenised alone, in order.
    prefix = aligner.prefix
    expected, chunk_sizes = list(prefix), []
    for chunk, _ in chunks:
        chunk_ids = aligner.backend.encode(chunk, add_special_tokens=False).ids
        expected += chunk_ids
        chunk_sizes.append(len(chunk_ids))
    assert expected == augment_ids, (expected, augment_ids)

    pieces = augment_tok.convert_ids_to_tokens(augment_ids)
    cjk = cjk_font() is not None
    print_tables(anchor_rows, chunks, pending, pieces, augment_ids, key_positions, visible_from)
    draw(anchor_rows, chunk_sizes, pieces, key_positions, visible_from, len(prefix), cjk)


def print_tables(anchor_rows, chunks, pending, pieces, augment_ids, key_positions, visible_from) -> None:
    print("| anchor position | token id | bytes | adds to the text |\n|---|---|---|---|")
    for t, (token, raw, added) in enumerate(anchor_rows):
        print(f"| {t} | {token} | `{raw.hex(' ')}` | {('`' + added + '`') if added else '(part of a character)'} |")
    print("\n| chunk | completed at anchor position |\n|---|---|")
    for chunk, t in chunks:
        print(f"| `{chunk}` | {t} |")
    print(f"| `{pending}` | (not yet: nothing follows it) |")
    print("\n| augment token | id | key_positions | visible_from |\n|---|---|---|---|")
    for s, (piece, token) in enumerate(zip(pieces, augment_ids)):
        print(f"| `{piece}` | {token} | {key_positions[s]} | {visible_from[s]} |")


def draw(anchor_rows, chunk_sizes, pieces, key_positions, visible_from, num_prefix, cjk: bool) -> None:
    if cjk:
        plt.rcParams["font.family"] = ["DejaVu Sans", cjk_font()]
    rows, cols = len(anchor_rows), len(pieces)
    visible = np.array([[visible_from[s] <= t for s in range(cols)] for t in range(rows)], dtype=float)

    fig, ax = plt.subplots(figsize=(7.6, 10.0))
    ax.imshow(visible, cmap=matplotlib.colors.ListedColormap(["#f4f4f4", "#3b7dd8"]), aspect="auto",
              vmin=0, vmax=1, interpolation="nearest")
    ax.scatter(range(cols), key_positions, marker="o", s=36, facecolors="none", edgecolors="#d62728",
               linewidths=1.6, zorder=3)

    labels = []
    for t, (_, raw, added) in enumerate(anchor_rows):
        if added:
            text = f"'{show(added, cjk)}'"
            if raw.decode("utf-8", errors="replace") != added:  # completes a character begun earlier
                text = f"{raw.hex()} → {text}"
        else:
            text = raw.hex(" ")
        labels.append(f"{t:>2}  {text}")
    ax.set_yticks(range(rows), labels, fontsize=9)
    ax.set_xticks(range(cols), [show(p, cjk) for p in pieces], rotation=90, fontsize=9)
    ax.set_ylabel("anchor position: its token (bytes in hex where not a whole character)")
    ax.set_xlabel("augment (Gemma-3) tokens")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()

    # Gridlines between cells and heavier lines between the augment tokens of different chunks.
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    edge = num_prefix
    for size in [0, *chunk_sizes[:-1]]:
        edge += size
        ax.axvline(edge - 0.5, color="black", linewidth=1.2)

    ax.legend(handles=[Patch(color="#3b7dd8", label="visible: the anchor position may attend to it"),
                       Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="#d62728",
                              label="key position (rotary): the anchor token\nthat brought its last character")],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=8, frameon=False)
    ax.set_title("SmolLM2 (anchor) reading Gemma-3's tokens (augment) of\n" + (f"“{TEXT}”" if cjk else ascii(TEXT)),
                 fontsize=10, pad=12, wrap=True)
    fig.tight_layout()
    fig.savefig(OUT, dpi=130)
    print(f"\nwrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
