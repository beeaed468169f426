"""`calm reproduce translation` on another machine (a GPU box) over the English prose of this one.

Two inputs of the reproduction come from the installation rather than from the data packages: D_C's replayed
prose is the CPython documentation's (`pydoc_data`, which changes between Python versions), and the anchor's
perplexity is measured on installed packages' descriptions (which change between versions of those packages).
A run elsewhere would train and measure on other text. `dump` writes both, as this machine has them, to a JSON
file; `run` runs the reproduction reading them from it, with any `calm reproduce translation` flags:

    python research/translation_device/run.py dump prose.json
    python research/translation_device/run.py run prose.json -- --seed 0 --device cuda --output-dir DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from calm.tasks import translation as task

SPLITS = ("validation", "test")


def dump(path: Path) -> None:
    snapshot = {"replay_prose": list(task.replay_prose()),
                "english_prose": {split: task.english_prose(split) for split in SPLITS}}
    path.write_text(json.dumps(snapshot, ensure_ascii=False))
    print(f"{len(snapshot['replay_prose'])} replay paragraphs, "
          + ", ".join(f"{len(v)} {k} perplexity paragraphs" for k, v in snapshot["english_prose"].items()))


def use(path: Path) -> None:
    """Make the reproduction read its prose from a `dump` file."""
    snapshot = json.loads(path.read_text())
    replay = tuple(snapshot["replay_prose"])

    def english_prose(split: str = "test", max_paragraphs: int = 0) -> list[str]:
        paragraphs = snapshot["english_prose"][split]
        return paragraphs[:max_paragraphs] if max_paragraphs else list(paragraphs)

    task.replay_prose = lambda: replay
    task.english_prose = english_prose


def without_hub_kernels() -> None:
    """Keep transformers from fetching kernels from the Hub (a GPU box may not reach it): every layer runs its
    torch implementation, as on a CPU."""
    import transformers.modeling_utils

    transformers.modeling_utils.kernelize = lambda *args, **kwargs: None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["dump", "run"])
    parser.add_argument("prose", type=Path, help="the JSON file `dump` writes and `run` reads")
    parser.add_argument("reproduce_args", nargs="*", help="after --: flags for `calm reproduce translation`")
    args = parser.parse_args(argv)
    if args.action == "dump":
        dump(args.prose)
        return
    use(args.prose)
    without_hub_kernels()
    from calm.cli import main as calm_main

    raise SystemExit(calm_main(["reproduce", "translation", *args.reproduce_args]))


if __name__ == "__main__":
    main()
