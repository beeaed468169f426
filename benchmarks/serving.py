"""Serving throughput (BENCHMARKS.md §8): `calm serve`'s engine and HTTP API answering 16 concurrent clients,
against the same server answering one request at a time, on the small pair.

    .venv/bin/python benchmarks/serving.py [--pair small] [--clients 16] [--requests 8] [--max-tokens 16] [--write]

The server runs in a background thread of this process, on 127.0.0.1, and the clients are `openai.AsyncOpenAI`
clients in the main thread. Every request is greedy, with a prompt of 8-24 words and exactly `--max-tokens` new
tokens (the tokenizer has no EOS). The sequential pass sends each distinct prompt once and keeps its answer; in the
concurrent pass each client sends `--requests` requests one after another, over the same prompts, and every answer
must equal the sequential one. Throughput is completed tokens per second of wall time; a round is one sequential
and one concurrent pass, and the ratio is taken round by round. `--write` puts the section into BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time

import common
import openai
from common import machine, pair, parse, parser, write_marked_section
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import calm
from calm.serve import Engine, create_app, serve_in_thread

NAME = "bench"


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """One word per id ("w2" ... "w<vocab-1>"), so every id the random model emits is visible text; no EOS."""
    words = {"<pad>": 0, "<unk>": 1} | {f"w{i}": i for i in range(2, vocab)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def prompts(count: int, vocab: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(2, vocab)}" for _ in range(rng.randint(8, 24))) for _ in range(count)]


async def ask(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    start = time.perf_counter()
    response = await client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return response.choices[0].text, response.usage.completion_tokens, time.perf_counter() - start


async def sequential(url: str, texts: list[str], max_tokens: int) -> dict:
    async with openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        answers = [await ask(client, prompt, max_tokens) for prompt in texts]
        seconds = time.perf_counter() - start
    return {"answers": {p: a[0] for p, a in zip(texts, answers)}, "tokens": sum(a[1] for a in answers),
            "seconds": seconds, "latencies": [a[2] for a in answers]}


async def concurrent(url: str, texts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    async def client_run(client: openai.AsyncOpenAI, c: int) -> list[tuple[str, tuple[str, int, float]]]:
        chosen = [texts[(c * requests + r) % len(texts)] for r in range(requests)]
        return [(prompt, await ask(client, prompt, max_tokens)) for prompt in chosen]

    async with openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(client_run(client, c) for c in range(clients)))
        seconds = time.perf_counter() - start
    flat = [item for result in results for item in result]
    return {"answers": [(p, a[0], a[1]) for p, a in flat], "tokens": sum(a[1] for _, a in flat), "seconds": seconds,
            "latencies": [a[2] for _, a in flat]}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, repeats=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--distinct", type=int, default=16, help="distinct prompts (each sent once sequentially)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parse(p, argv)
    common.clock = "wall"  # a server is judged by wall time (noted in `machine()`)

    anchor, augment = pair(args.pair)
    model = calm.compose(anchor, augment, every=2, init="random")  # as §4: the augment is tapped to its last block
    vocab = anchor.config.vocab_size
    engine = Engine(model, word_tokenizer(vocab), max_batch_size=args.max_batch_size,
                    batch_window=args.batch_window_ms / 1000)
    texts = prompts(args.distinct, vocab)
    rounds = []
    with serve_in_thread(create_app(engine, NAME)) as url:
        asyncio.run(sequential(url, texts[:2], args.max_tokens))  # warm-up
        for r in range(args.repeats):
            before = len(engine.batch_sizes)
            seq = asyncio.run(sequential(url, texts, args.max_tokens))
            conc = asyncio.run(concurrent(url, texts, args.clients, args.requests, args.max_tokens))
            wrong = sum(text != seq["answers"][prompt] or tokens != args.max_tokens
                        for prompt, text, tokens in conc["answers"])
            batches = list(engine.batch_sizes)[before + len(texts):]
            rounds.append({"sequential_tokens_per_s": seq["tokens"] / seq["seconds"],
                           "concurrent_tokens_per_s": conc["tokens"] / conc["seconds"],
                           "sequential_seconds": seq["seconds"], "concurrent_seconds": conc["seconds"],
                           "sequential_latency_s": statistics.median(seq["latencies"]),
                           "concurrent_latency_s": statistics.median(conc["latencies"]),
                           "requests": len(conc["answers"]), "wrong": wrong,
                           "mean_batch": statistics.mean(batches), "max_batch": max(batches)})
            print(f"round {r}: {json.dumps(rounds[-1])}", flush=True)
    ratios = [x["concurrent_tokens_per_s"] / x["sequential_tokens_per_s"] for x in rounds]
    result = {"machine": machine(), "pair": args.pair, "clients": args.clients, "requests_per_client": args.requests,
              "max_tokens": args.max_tokens, "distinct_prompts": args.distinct, "repeats": args.repeats,
              "max_batch_size": args.max_batch_size, "batch_window_ms": args.batch_window_ms,
              "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
              "errors_or_wrong": sum(x["wrong"] for x in rounds), "rounds": rounds}
    print(json.dumps(result, indent=2))
    if args.write:
        write_marked_section("serving", "serving.py", section(result, sys.argv[1:] if argv is None else argv))
    return result


def section(result: dict, argv: list[str] | None) -> list[str]:
    rounds = result["rounds"]
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    command = " ".join(["python benchmarks/serving.py", *(argv or [])]).replace(" --write", "")
    total = result["clients"] * result["requests_per_client"]
    return [
        "## 8. Serving: 16 concurrent clients against sequential requests (issue 30)",
        "",
        f"`calm serve`'s engine and HTTP API on 127.0.0.1, on the {result['pair']} pair (composed with `every=2`, as "
        f"§4). Sequential: {result['distinct_prompts']} greedy requests, one at a time, one per distinct prompt of "
        f"8-24 tokens. Concurrent: {result['clients']} clients (`openai.AsyncOpenAI`) × "
        f"{result['requests_per_client']} requests each, one after another, over the same prompts ({total} "
        f"requests). Every request asks for exactly {result['max_tokens']} new tokens; every concurrent answer must "
        "equal the sequential answer to its prompt. Server and clients share one process (the server in a "
        f"background thread); batches of at most {result['max_batch_size']}, collected while requests arrive "
        f"within {result['batch_window_ms']:g} ms of each other. Throughput is completed tokens per second of wall "
        f"time, the ratio taken round by round over {len(rounds)} rounds (median, and range). Target: ≥ 3× at 16 "
        "clients.",
        "",
        f"Command: `{command}`. Machine: {result['machine']}.",
        "",
        "| pair | clients × requests | sequential tokens/s | concurrent tokens/s | speed-up | range over rounds | "
        "mean batch | median latency: sequential, concurrent | errors or wrong answers |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['pair']} | {result['clients']} × {result['requests_per_client']} | "
        f"{med['sequential_tokens_per_s']:.1f} | {med['concurrent_tokens_per_s']:.1f} | "
        f"{result['speedup']:.2f}× | {result['speedup_range'][0]:.2f}–{result['speedup_range'][1]:.2f} | "
        f"{med['mean_batch']:.1f} | {med['sequential_latency_s']:.2f} s, {med['concurrent_latency_s']:.2f} s | "
        f"{result['errors_or_wrong']} of {total * len(rounds)} |",
        "",
        "Requests that arrive while a batch decodes wait for it to end and are then decoded together (they do not "
        "join a running batch), so a request's latency grows with the batch it joins; throughput grows because "
        "one decoding step over a batch costs far less than a step per request.",
    ]


if __name__ == "__main__":
    main()
