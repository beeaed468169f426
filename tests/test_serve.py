"""`calm serve`: the OpenAI-compatible server, through the official `openai` client and raw HTTP, on 127.0.0.1.

One tiny random composition (Llama anchor, Qwen2 augment) is saved to disk and served from a background thread;
a second copy of it, loaded separately, generates the reference answers (the server's model belongs to its
worker thread). Its tokenizer is the character-level one of the training tests with 50 more characters, so that
every id the 96-token models can emit is visible text.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import VOCAB, tiny
from tokenizer_support import char_tokenizer as byte_fallback_tokenizer
from train_worker import char_tokenizer
from transformers import AutoModelForCausalLM

import calm
from calm.cli import main
from calm.serve import Detokenizer, Engine, StopFilter, create_app, free_port, serve_in_thread

NAME = "tiny-calm"
EXTRA_CHARS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ!?,;()[]{}<>/*&%$#@~_|'\"")
CHAT_TEMPLATE = "<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}. {% endfor %}assistant:"
PROMPTS = ["12+7=", "a", "hello world 123", "9", "the quick brown fox jumps", "x=1", "Abc!", "zz top 42 + 17 ="]
CALM = str(Path(sys.executable).parent / "calm")


def visible_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(EXTRA_CHARS)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def composition(tmp_path_factory) -> Path:
    """A saved composition whose config names its bases on disk, with its tokenizer beside it."""
    root = tmp_path_factory.mktemp("serve")
    tiny("llama", 32, 2, 4, seed=0).save_pretrained(root / "anchor")
    tiny("qwen2", 16, 2, 2, seed=1).save_pretrained(root / "augment")
    model = calm.compose(AutoModelForCausalLM.from_pretrained(root / "anchor"),
                         AutoModelForCausalLM.from_pretrained(root / "augment"), num_connections=2, init="random",
                         tokenizer=visible_tokenizer())
    model.save_pretrained(root / "composition")
    return root / "composition"


@pytest.fixture(scope="module")
def reference(composition):
    """Greedy answers of a request alone, from a separate copy of the model: (text, finish_reason, ids)."""
    model = calm.CALMForCausalLM.from_pretrained(composition)
    tokenizer = model.tokenizer

    def greedy(ids: list[int], max_tokens: int) -> tuple[str, str]:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=1)
        new, finish = out[0, len(ids):].tolist(), "length"
        if 1 in new:
            new, finish = new[:new.index(1)], "stop"
        return tokenizer.decode(new, skip_special_tokens=True), finish

    def complete(prompt: str, max_tokens: int) -> tuple[str, str]:
        return greedy(tokenizer(prompt)["input_ids"], max_tokens)

    def chat(messages: list[dict], max_tokens: int) -> tuple[str, str]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return greedy(tokenizer(text, add_special_tokens=False)["input_ids"], max_tokens)

    return SimpleNamespace(complete=complete, chat=chat, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(composition):
    model = calm.CALMForCausalLM.from_pretrained(composition)
    engine = Engine(model, model.tokenizer, max_batch_size=32, batch_window=0.02)
    with serve_in_thread(create_app(engine, NAME)) as url:
        yield SimpleNamespace(url=url, engine=engine, client=openai.OpenAI(base_url=url, api_key="-", max_retries=0))


def streamed(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    """Texts and finish reasons per choice index, and the usage, of a completion or chat stream."""
    texts, finishes, usage = {}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


# ------------------------------------------------------------------------------------------ the endpoints


def test_models_are_listed_and_unknown_ones_are_404(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")


def test_a_completion_is_the_greedy_continuation(server, reference):
    for prompt in PROMPTS[:3]:
        response = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        text, finish = reference.complete(prompt, 12)
        assert (response.choices[0].text, response.choices[0].finish_reason) == (text, finish)
        assert response.usage.prompt_tokens == len(reference.tokenizer(prompt)["input_ids"])
        assert response.usage.completion_tokens == (12 if finish == "length" else response.usage.completion_tokens)
    several = server.client.completions.create(model=NAME, prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert [c.text for c in several.choices] == [reference.complete(p, 6)[0] for p in PROMPTS[:2] for _ in "nn"]


def test_a_streamed_completion_equals_the_whole_one(server, reference):
    chunks = server.client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    texts, finishes, usage = streamed(chunks)
    assert (texts[0], finishes[0]) == reference.complete(PROMPTS[2], 20)
    assert usage.completion_tokens <= 20 and usage.prompt_tokens == len(reference.tokenizer(PROMPTS[2])["input_ids"])


def test_chat_goes_through_the_chat_template_whole_and_streamed(server, reference):
    messages = [{"role": "system", "content": "add numbers"}, {"role": "user", "content": "12+7="}]
    expected = reference.chat(messages, 10)
    whole = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == expected
    chunks = list(server.client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, finishes, _ = streamed(chunks)
    assert (texts[0], finishes[0]) == expected


def test_greedy_output_is_the_same_alone_and_in_a_batch(server, reference):
    """Requests queued behind a long one are decoded together, left-padded, beside a sampled request, and each
    greedy one still gets exactly what it gets alone."""
    client, engine = server.client, server.engine
    before = len(engine.batch_sizes)
    blocker = client.completions.create(model=NAME, prompt="1", max_tokens=250, temperature=0, stream=True)
    next(iter(blocker))  # the blocker's batch is running: everything below queues up behind it
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        sampled = pool.submit(client.completions.create, model=NAME, prompt="a", max_tokens=16, temperature=1.0,
                              seed=3)
        greedy = [pool.submit(client.completions.create, model=NAME, prompt=p, max_tokens=16, temperature=0)
                  for p in PROMPTS]
        deadline = time.monotonic() + 20
        while engine.queued < len(PROMPTS) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 1, "the blocker ended before the others were queued"
        blocker.close()
        answers = [f.result().choices[0] for f in greedy]
        assert sampled.result().choices[0].finish_reason in ("stop", "length")
    assert [(a.text, a.finish_reason) for a in answers] == [reference.complete(p, 16) for p in PROMPTS]
    assert max(list(engine.batch_sizes)[before:]) == len(PROMPTS) + 1


def test_seeded_sampling_repeats_and_n_gives_n_choices(server):
    ask = dict(model=NAME, prompt="hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    first, second = (server.client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == second
    three = server.client.completions.create(**ask, n=3)
    assert len(three.choices) == 3 and three.choices[0].text == first  # choice j samples with seed + j


def test_stop_strings_cut_the_output_before_the_first_one(server, reference):
    prompt = PROMPTS[4]
    full, _ = reference.complete(prompt, 40)
    assert len(full) >= 8, full
    stop = full[4:6]
    expected = full[:full.find(stop)]
    whole = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0,
                                             stop=[stop, "never seen"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    texts, finishes, _ = streamed(server.client.completions.create(model=NAME, prompt=prompt, max_tokens=40,
                                                                   temperature=0, stop=stop, stream=True))
    assert (texts[0], finishes[0]) == (expected, "stop")
    unmatched = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0,
                                                 stop="never seen")
    assert unmatched.choices[0].text == full


# ------------------------------------------------------------------------------------------ bad requests


BAD = [
    ("completions", {"model": "gpt-4", "prompt": "1"}, 404, "model", "model_not_found"),
    ("chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("completions", {"model": NAME, "prompt": "1", "max_tokens": -1}, 400, "max_tokens", None),
    ("completions", {"model": NAME, "prompt": "1" * 300}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"model": NAME, "prompt": "1" * 200, "max_tokens": 100}, 400, "prompt",
     "context_length_exceeded"),
    ("completions", b'{"model": "tiny-calm", "prompt": ', 400, None, "json_invalid"),
    ("completions", {"model": NAME, "prompt": "1", "temperature": 3}, 400, "temperature", None),
    ("completions", {"model": NAME, "prompt": "1", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("completions", {"model": NAME}, 400, "prompt", None),
    ("completions", {"model": NAME, "prompt": [1, 2, 500]}, 400, "prompt", None),
    ("completions", {"model": NAME, "prompt": "1", "logprobs": 2}, 400, None, None),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages", None),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", None),
    ("models/gpt-4", None, 404, "model", "model_not_found"),
    ("no/such/route", None, 404, None, "not_found"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, reference):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, param, code in BAD:
            if body is None:
                response = http.get(path)
            elif isinstance(body, bytes):
                response = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = http.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert (error["param"], error["code"]) == (param, code), (path, body, error)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model=NAME, prompt="1", max_tokens=-5)
    answer = server.client.completions.create(model=NAME, prompt="12+7=", max_tokens=5, temperature=0)
    assert answer.choices[0].text == reference.complete("12+7=", 5)[0]


def test_a_client_that_leaves_frees_its_slot(server):
    """Mid-stream, or before a whole response is ready: its row stops before its 250 tokens."""
    engine = server.engine
    body = {"model": NAME, "prompt": "1", "max_tokens": 250, "temperature": 0}
    # The tiny model writes 250 tokens faster than the server polls for a gone client (every 0.5 s): slow each
    # step so that the row is still running when the departure is noticed, on any machine.
    slow_steps = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    with slow_steps, httpx.Client(base_url=server.url, timeout=30) as http:
        for stream in (True, False):
            cancelled = engine.cancelled_rows
            if stream:
                with http.stream("POST", "completions", json=body | {"stream": True}) as response:
                    assert next(line for line in response.iter_lines() if line.startswith("data: "))
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("completions", json=body, timeout=0.3)
            deadline = time.monotonic() + 10
            while (engine.running or engine.cancelled_rows == cancelled) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.running == 0 and engine.cancelled_rows == cancelled + 1, stream


def test_sixteen_concurrent_clients_of_eight_requests_each_all_get_the_right_answer(server, reference):
    expected = {p: reference.complete(p, 8)[0] for p in PROMPTS}
    before = len(server.engine.batch_sizes)

    async def one_client(client: openai.AsyncOpenAI, c: int) -> list[tuple[str, str]]:
        answers = []
        for r in range(8):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            response = await client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
            answers.append((prompt, response.choices[0].text))
        return answers

    async def load() -> list[list[tuple[str, str]]]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one_client(client, c) for c in range(16))), 90)

    results = asyncio.run(load())
    assert sum(len(r) for r in results) == 128
    assert all(text == expected[prompt] for answers in results for prompt, text in answers)
    batches = list(server.engine.batch_sizes)[before:]
    assert sum(batches) == 128 and max(batches) > 1 and len(batches) < 128


# ------------------------------------------------------------------------------------------ text pieces


def test_incremental_decoding_releases_multibyte_characters_whole():
    tokenizer = byte_fallback_tokenizer()
    text = "héllo → 日本語 ✓ ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the non-Latin characters are several byte tokens each
    decoder = Detokenizer(tokenizer, [])
    pieces = [decoder.add(token) for token in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in piece for piece in pieces) and "日" in pieces


def test_stop_filter_holds_back_what_may_begin_a_stop_string():
    stops = StopFilter(["abc", "xyz"])
    assert stops.feed("1a") == ("1", False)  # "a" may begin "abc"
    assert stops.feed("b") == ("", False)
    assert stops.feed("d") == ("abd", False)
    assert stops.feed("xyabc") == ("xy", True)  # "xy" may begin "xyz" until the text shows "abc" first
    assert stops.text[:stops.sent] == "1abdxy"


# ------------------------------------------------------------------------------------------ the command


def test_serve_help_and_a_busy_port_fail_before_loading_anything(composition, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--composition" in capsys.readouterr().out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--composition", "no/such/dir", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_calm_serve_answers_then_shuts_down_cleanly_on_a_signal(composition, sig):
    """The installed command serves the saved composition (its tokenizer and chat template come with it); a signal
    ends a stream that is still decoding with an error event, and the process exits 0 without a traceback."""
    port = free_port()
    process = subprocess.Popen([CALM, "serve", "--composition", str(composition), "--port", str(port),
                                "--shutdown-timeout", "0.5", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "calm serve did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        chat = client.chat.completions.create(model="composition", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
        events: list[str] = []
        body = {"model": "composition", "prompt": "1", "max_tokens": 250, "temperature": 0, "stream": True}
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    started.set()
                    events.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        process.send_signal(sig)
        _, err = process.communicate(timeout=30)
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    last = [json.loads(e[6:]) for e in events if e.startswith("data: {")][-1]
    assert "error" in last or last["choices"][0]["finish_reason"] == "length"
