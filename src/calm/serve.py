"""An OpenAI-compatible HTTP server for a composed model (`calm serve`; the `serve` extra: FastAPI + uvicorn).

    engine = Engine(model, tokenizer)                  # the only user of `model` from now on
    app = create_app(engine, model_name="my-composition")
    run(app, host="127.0.0.1", port=8000)              # or: with serve_in_thread(app) as base_url: ...

It serves `/v1/completions`, `/v1/chat/completions` (through the tokenizer's chat template) and `/v1/models`, with
server-sent-event streaming. One worker thread owns the model. Requests that arrive while it is busy, or within
`batch_window` seconds of each other, are decoded as one left-padded batch by `model.generate`; a request that
arrives while a batch runs waits for the next one (it does not join the running batch). Each decoding step hands
every row its new token (`_Step`), which decodes it incrementally, applies the row's stop strings and
`max_tokens`, and streams the text to the row's request. Sampling is done per row, with the row's own temperature,
top-p and random generator (`_Sampler`), so rows of one batch can differ in their parameters, and a seeded
request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .data import context_length, model_configs, pad, pad_token_id

MAX_STOPS = 4  # OpenAI's limit on stop strings
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
WINDOWS = 5  # a batch waits at most this many collection windows for more requests


# ------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first bad field (FastAPI's own answer would be a 422 in its own format)."""
    first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"could not parse the JSON body of the request: {first.get('msg')}", code="json_invalid")
    path = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = path[0] if path else None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError(400, f"{'.'.join(path)}: {message}" if path else message, param=param)


# ----------------------------------------------------------------------------------------------- requests


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Parameters shared by completions and chat. Unknown fields are ignored, as most OpenAI-compatible servers
    do; known ones this server cannot honour are refused rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> _Common:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them at 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo or self.logprobs is not None or self.suffix:
            raise ValueError("echo, logprobs and suffix are not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        return self


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Common):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[_Message]) -> list[_Message]:
        for message in messages:
            message.text()  # refuses non-text parts here, as a 400
        return messages

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatRequest:
        if self.logprobs or self.tools:
            raise ValueError("logprobs and tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        return self


# ----------------------------------------------------------------------------------------- per-row decoding


class Detokenizer:
    """Turns one row's tokens into text as they come. A token's text can depend on its neighbours (SentencePiece's
    leading space) and a character can span several byte tokens, so each step decodes a short window of recent
    tokens and releases only text that no longer ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], context: int = 5) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:])  # the prompt's tail gives the first new token its context
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that `token` completes (possibly empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character stays U+FFFD), at the end of the row."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopFilter:
    """Cuts a row's text at the first stop string. Text that could still turn out to begin a stop string is held
    back until it cannot, so no part of a stop string is ever streamed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text now safe to send, whether a stop string was reached)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(self.text) - self._held(), False
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out, stopped

    def _held(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of some stop string."""
        tail = self.text[self.sent:]
        for length in range(min(len(tail), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-length:]) for s in self.stops):
                return length
        return 0

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class Sampling:
    """How one choice is generated. temperature 0: greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finish:
    index: int
    reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int


class Submission:
    """One HTTP request's choices on their way through the engine. The worker thread posts `Delta`/`Finish`
    events (or an `APIError`) onto the request's event loop; `cancel` (client gone) makes its rows stop at the
    next decoding step."""

    def __init__(self, num_choices: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = num_choices
        self.cancelled = False

    def post(self, event: Delta | Finish | APIError) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """Every event until each choice has finished; an engine failure is raised as its `APIError`."""
        while self.pending:
            event = await self.queue.get()
            if isinstance(event, APIError):
                raise event
            if isinstance(event, Finish):
                self.pending -= 1
            yield event


class Row:
    """One choice being decoded: its prompt, parameters and text state."""

    def __init__(self, submission: Submission, index: int, prompt_ids: list[int], sampling: Sampling,
                 tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.submission, self.index, self.prompt_ids, self.sampling = submission, index, prompt_ids, sampling
        self.eos_ids = eos_ids
        self.detokenizer = Detokenizer(tokenizer, prompt_ids)
        self.stops = StopFilter(sampling.stop)
        self.tokens = 0
        self.finished = self.cancelled = False
        self.generator: torch.Generator | None = None

    def start(self, device: torch.device) -> None:
        """Seed the row's own random generator (sampled rows only), on the device the logits live on."""
        if self.sampling.temperature > 0:
            seed = self.sampling.seed
            seed = random.SystemRandom().randrange(2**63) if seed is None else (seed + self.index) % 2**63
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def feed(self, token: int) -> None:
        """Take the row's next token: stream its text, and finish on EOS, a stop string or `max_tokens`."""
        if self.submission.cancelled:
            self.finished = self.cancelled = True  # nobody to tell
            return
        self.tokens += 1
        if token in self.eos_ids:
            self._finish("stop")
            return
        text, stopped = self.stops.feed(self.detokenizer.add(token))
        self._send(text)
        if stopped:
            self._finish("stop", flush=False)
        elif self.tokens >= self.sampling.max_tokens:
            self._finish("length")

    def _finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            text, stopped = self.stops.feed(self.detokenizer.flush())
            self._send(text if stopped else text + self.stops.flush())
            reason = "stop" if stopped else reason
        self.finished = True
        self.submission.post(Finish(self.index, reason, self.tokens))

    def end(self) -> None:
        """Generation ended without this row finishing (it can only have run out of room)."""
        if not self.finished:
            self._finish("length")

    def fail(self, error: APIError) -> None:
        self.finished = True
        self.submission.post(error)

    def _send(self, text: str) -> None:
        if text:
            self.submission.post(Delta(self.index, text))

    def sample(self, logits: torch.Tensor) -> int:
        """A token drawn from the row's temperature- and top-p-shaped distribution, with its own generator."""
        logits = logits.float() / self.sampling.temperature
        if self.sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = probs.cumsum(-1) - probs > self.sampling.top_p  # the most likely token always stays
            logits = logits.index_fill(0, order[outside], float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator))


class _Step(StoppingCriteria):
    """`generate` calls this after every decoding step with the whole batch: each row takes its new token, and the
    answer tells `generate` which rows are done (EOS, stop string, `max_tokens`, their client left, or the server
    is shutting down)."""

    def __init__(self, rows: Sequence[Row], lock: threading.Lock, stopping: threading.Event) -> None:
        self.rows, self.lock, self.stopping = rows, lock, stopping

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        with self.lock:
            for row, token in zip(self.rows, tokens):
                if self.stopping.is_set() and not row.finished:
                    row.fail(_shutting_down())
                elif not row.finished:
                    row.feed(token)
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error")


class _Sampler(LogitsProcessor):
    """Per-row sampling inside a greedy `generate`: a sampled row's scores become one finite entry (its drawn
    token), which greedy selection then picks; greedy rows are left alone, so they decode exactly as alone."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = [(i, row) for i, row in enumerate(rows) if row.sampling.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in self.rows:
            if not row.finished:
                token = row.sample(scores[i])
                scores[i] = float("-inf")
                scores[i, token] = 0.0
        return scores


# ------------------------------------------------------------------------------------------------- engine


class Engine:
    """Owns the model: a worker thread collects queued rows into batches and decodes each with `generate`.

    `max_batch_size` rows at most per batch; a batch takes rows for as long as each arrives within `batch_window`
    seconds of the one before (see `_collect`). `chat_template` overrides the tokenizer's (a Jinja string)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, batch_window: float = 0.01,
                 chat_template: str | None = None, augment_mode: str | None = None) -> None:
        if max_batch_size < 1 or batch_window < 0:
            raise ValueError(f"max_batch_size must be >= 1 and batch_window >= 0, got {max_batch_size}, "
                             f"{batch_window}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.chat_template, self.augment_mode = chat_template, augment_mode
        self.context = context_length(model_configs(model))
        self.vocab_size = model.config.anchor["vocab_size"]
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.lock = threading.Lock()  # a fast tokenizer must not be used from two threads at once
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # recent batches, for tests and benchmarks
        self.cancelled_rows = 0
        self._queue: queue.Queue[Row] = queue.Queue()
        self._running: list[Row] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ encoding (on the event loop, under the lock)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids, encoded as training and `calm eval` encode prompts (with the tokenizer's specials)."""
        with self.lock:
            return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the chat template, ending with the assistant's turn opened."""
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model's tokenizer has no chat template: start the server with "
                                "--chat-template FILE, or use /v1/completions", param="messages")
        with self.lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as e:  # the template's own checks (e.g. roles must alternate) raise here
                raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def budget(self, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
        """`max_tokens` checked against the context (None: the rest of it); refuses empty or unknown tokens."""
        if not prompt_ids:
            raise APIError(400, "the prompt encodes to no tokens", param=param)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param=param)
        if self.context is None:
            return max_tokens or 2**31 - 1
        room = self.context - len(prompt_ids)
        if room < 1 or (max_tokens or 1) > room:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens, but "
                                f"{len(prompt_ids)} are in the prompt and {max_tokens or 1} were requested for the "
                                "completion: shorten the prompt or lower max_tokens", param=param,
                           code="context_length_exceeded")
        return max_tokens or room

    # ---------------------------------------------------------------------------------- worker

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="calm-serve-engine", daemon=True)
            self._thread.start()

    def interrupt(self) -> None:
        """Refuse new and queued requests; rows being decoded fail with a 503 at the next step. Returns at once."""
        self._stopping.set()
        self._refuse_queued()

    def stop(self, timeout: float = 30.0) -> None:
        """`interrupt`, then wait for the worker to end."""
        self.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._refuse_queued()  # anything submitted while the worker was finishing

    def submit(self, rows: Sequence[Row]) -> None:
        if self._stopping.is_set():
            raise _shutting_down()
        for row in rows:
            self._queue.put(row)

    @property
    def queued(self) -> int:
        """Rows waiting for a batch."""
        return self._queue.qsize()

    @property
    def running(self) -> int:
        """Rows of the running batch still being decoded."""
        return sum(not row.finished for row in self._running)

    def _refuse_queued(self) -> None:
        while True:
            try:
                self._queue.get_nowait().fail(_shutting_down())
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stopping.is_set():
            rows = self._collect()
            if rows:
                self._run(rows)

    def _collect(self) -> list[Row]:
        """The next batch: the first queued row, then more for as long as each arrives within the window of the
        one before (clients answered together come back a few ms apart), for at most `WINDOWS` windows."""
        try:
            rows = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        now = time.monotonic()
        deadline, last_call = now + self.batch_window, now + WINDOWS * self.batch_window
        while len(rows) < self.max_batch_size:
            remaining = min(deadline, last_call) - time.monotonic()
            try:
                rows.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
            deadline = time.monotonic() + self.batch_window
        live = [row for row in rows if not row.submission.cancelled]
        self.cancelled_rows += len(rows) - len(live)
        return live

    @torch.no_grad()
    def _run(self, rows: list[Row]) -> None:
        """Decode one batch, left-padded, with each row's own length limit, stop strings and sampling."""
        device = self.model.device
        input_ids = pad([row.prompt_ids for row in rows], self.pad_id, "left").to(device)
        attention_mask = pad([[1] * len(row.prompt_ids) for row in rows], 0, "left").to(device)
        for row in rows:
            row.start(device)
        self._running = rows
        self.batch_sizes.append(len(rows))
        mode = {} if self.augment_mode is None else {"augment_mode": self.augment_mode}
        step = _Step(rows, self.lock, self._stopping)
        try:
            self.model.generate(input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                                max_new_tokens=max(row.sampling.max_tokens for row in rows),
                                pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None,
                                logits_processor=LogitsProcessorList([_Sampler(rows)]),
                                stopping_criteria=StoppingCriteriaList([step]), **mode)
            with self.lock:
                for row in rows:
                    row.end()
        except Exception as e:  # one failed batch fails its requests, and the server keeps serving
            error = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            for row in rows:
                if not row.finished:
                    row.fail(error)
        finally:
            self.cancelled_rows += sum(row.cancelled for row in rows)
            self._running = []


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS and the model's generation EOS ids (chat models often end a turn with another)."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


# ------------------------------------------------------------------------------------------------ the API


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops `engine`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="calm", summary="an OpenAI-compatible server for a composed model", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:  # a bug: still OpenAI's format
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=code).response()

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "calm"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompts = [engine.encode(p) if isinstance(p, str) else p for p in _prompt_list(body.prompt)]
        budgets = [engine.budget(ids, body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, "prompt") for ids in prompts]
        return await _answer(engine, _Reply("completion", model_name), body, prompts, budgets, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        budget = engine.budget(ids, body.max_completion_tokens or body.max_tokens, "messages")
        return await _answer(engine, _Reply("chat", model_name), body, [ids], [budget], request)

    return app


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completion request's prompts: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


class _Reply:
    """The shapes of a completion's or a chat completion's responses and stream chunks."""

    def __init__(self, kind: str, model_name: str) -> None:
        self.kind, self.model_name = kind, model_name
        prefix, self.object = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, obj: str, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, index: int, text: str | None, finish: str | None, message: bool) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        key = "message" if message else "delta"
        content = {"role": "assistant", "content": text} if message else ({} if text is None else {"content": text})
        return {"index": index, key: content, "logprobs": None, "finish_reason": finish}

    def full(self, texts: list[str], finishes: list[str], usage: dict) -> dict[str, Any]:
        choices = [self._choice(i, t, f, message=True) for i, (t, f) in enumerate(zip(texts, finishes))]
        return self._envelope(self.object, choices, usage)

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        choice = self._choice(index, text, finish, message=False)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        obj = "chat.completion.chunk" if self.kind == "chat" else self.object
        return _sse(self._envelope(obj, [choice]))

    def usage_chunk(self, usage: dict) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else self.object
        return _sse(self._envelope(obj, [], usage))


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _answer(engine: Engine, reply: _Reply, body: _Common, prompts: list[list[int]], budgets: list[int],
                  request: Request) -> Any:
    """Queue one row per prompt and choice (choice index = prompt index × n + j), then answer whole or stream."""
    submission = Submission(len(prompts) * body.n)
    rows = []
    for p, (ids, budget) in enumerate(zip(prompts, budgets)):
        for j in range(body.n):
            sampling = Sampling(budget, body.temperature, body.top_p, body.stop, body.seed)
            rows.append(Row(submission, p * body.n + j, ids, sampling, engine.tokenizer, engine.eos_ids))
    engine.submit(rows)
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        return StreamingResponse(_stream(submission, reply, prompt_tokens, body.include_usage(), len(rows)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(submission, reply, prompt_tokens, len(rows), request)


async def _whole(submission: Submission, reply: _Reply, prompt_tokens: int, count: int, request: Request) -> Any:
    """The complete response; a client that leaves before it is ready has its rows cancelled."""
    texts, finishes, tokens = [""] * count, ["length"] * count, [0] * count

    async def drain() -> None:
        async for event in submission.events():
            if isinstance(event, Delta):
                texts[event.index] += event.text
            else:
                finishes[event.index], tokens[event.index] = event.reason, event.tokens

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return JSONResponse({}, status_code=499)  # nobody reads it
        task.result()  # an engine failure: its APIError
    finally:
        submission.cancel()  # no-op once every row has finished
    return reply.full(texts, finishes, _usage(prompt_tokens, sum(tokens)))


async def _stream(submission: Submission, reply: _Reply, prompt_tokens: int, include_usage: bool,
                  count: int) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text and one per finished choice, then `[DONE]`. Starlette ends
    this generator when the client disconnects; `finally` then cancels the rows, freeing their batch slots."""
    tokens = 0
    try:
        if reply.kind == "chat":
            for index in range(count):
                yield reply.chunk(index, None, role=True)
        async for event in submission.events():
            if isinstance(event, Delta):
                yield reply.chunk(event.index, event.text)
            else:
                tokens += event.tokens
                yield reply.chunk(event.index, None if reply.kind == "chat" else "", finish=event.reason)
        if include_usage:
            yield reply.usage_chunk(_usage(prompt_tokens, tokens))
        yield "data: [DONE]\n\n"
    except APIError as error:
        yield _sse(error.body())
    finally:
        submission.cancel()


# ---------------------------------------------------------------------------------------------- running


def check_port(host: str, port: int) -> None:
    """Raise `OSError` now, before minutes of model loading, when `host:port` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        shutdown_timeout: float = 5.0) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly: no new requests, in-flight ones get
    `shutdown_timeout` seconds to finish, after which those still decoding end with a 503 error (a stream gets it
    as its last event), and the engine stops. Returns normally after a signal."""
    import signal

    import uvicorn

    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        timer: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self.timer is None:  # cut off what is left before uvicorn would cancel it (and log tracebacks)
                self.timer = threading.Timer(shutdown_timeout, engine.interrupt)
                self.timer.daemon = True
                self.timer.start()

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=shutdown_timeout + 5.0))
    # uvicorn re-raises the signal it handled once it has shut down; by then there is nothing left to do.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                    timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, benchmarks); yields the base URL (`http://host:port/v1`)."""
    import uvicorn

    port = free_port(host) if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="calm-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
