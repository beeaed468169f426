"""Helpers for the training tests, and a worker script that runs `calm train` in a subprocess.

As a script (`python tests/train_worker.py --report DIR <calm train flags>`, also under `torchrun`), it trains
and writes DIR/rank<R>.json with the world size this process really ran with, so a test can tell that two
processes took part.
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny  # noqa: E402

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3: the tiny models' pad, eos and bos ids


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over letters, digits and a few symbols; encoding prepends <s>."""
    chars = sorted(set(string.ascii_lowercase + string.digits + " +-=:."))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def sum_examples(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion examples of small additions, e.g. {"prompt": "12+7=", "completion": "19"}."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 49), rng.randint(0, 49)) for _ in range(count)]
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_assets(root: Path, num_examples: int = 16, augment_tokenizer: bool = False) -> dict[str, Path]:
    """Tiny anchor and augment models, the tokenizer and train/eval sets on disk, for `calm train`. With
    `augment_tokenizer`, the augment has a tokenizer of its own (character-level with byte fallback, another
    vocabulary), saved under "augment_tokenizer"."""
    paths = {"anchor": root / "anchor", "augment": root / "augment", "tokenizer": root / "tokenizer",
             "train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    tiny("llama", 32, 2, 4, seed=0).save_pretrained(paths["anchor"])
    if augment_tokenizer:
        from tokenizer_support import char_tokenizer as byte_fallback_tokenizer
        from transformers import Qwen2Config, Qwen2ForCausalLM

        own = byte_fallback_tokenizer()
        paths["augment_tokenizer"] = root / "augment_tokenizer"
        own.save_pretrained(paths["augment_tokenizer"])
        config = Qwen2Config(vocab_size=len(own), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32, max_position_embeddings=256,
                             pad_token_id=own.pad_token_id, eos_token_id=own.eos_token_id)
        Qwen2ForCausalLM(config).save_pretrained(paths["augment"])
    else:
        tiny("qwen2", 16, 2, 2, seed=1).save_pretrained(paths["augment"])
    char_tokenizer().save_pretrained(paths["tokenizer"])
    write_jsonl(sum_examples(num_examples), paths["train"])
    write_jsonl(sum_examples(4, seed=1), paths["eval"])
    return paths


def main(argv: list[str]) -> None:
    report = Path(argv[argv.index("--report") + 1])
    flags = argv[: argv.index("--report")] + argv[argv.index("--report") + 2 :]
    from calm.cli import train_main

    result = train_main(flags)
    report.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": result.world_size, "global_step": result.global_step,
              "eval_metrics": result.eval_metrics, "augment_cache": result.augment_cache}
    (report / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
