"""The OpenAI-compatible HTTP API (FastAPI under uvicorn) and the generation thread that batches requests.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain, or SSE with ``stream: true``; ``usage`` in
both), ``POST /v1/feedback`` (with --learn), ``GET /healthz``, ``GET /metrics`` (Prometheus text).

One thread owns generation: requests wait in a bounded queue (full: 429 at once, never a hang), the thread
takes up to ``serve.max_batch`` of them, holds the swap lock for the batch, and answers each with the version
it read at the start of the batch (``system_fingerprint``). Every error a client can cause is a 4xx whose body
is one line in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.generation.streamers import BaseStreamer

from fastslow.config import Config
from fastslow.serve.learner import Served
from fastslow.serve.store import FeedbackStore
from fastslow.tasks import Problem, safe_verify
from fastslow.util import derive_seed, one_line, redact

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered to the client: status, one-line message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_body(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": one_line(message, 300), "type": kind, "param": param, "code": code}},
                        status_code=status)


# ---- requests -------------------------------------------------------------------------------------
class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other options (logprobs, tools, ...) are not honoured
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    reward: float = Field(ge=0, le=1, allow_inf_nan=False)
    text: str | None = Field(None, max_length=4000)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    e = err.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    return f"{param}: {e['msg']}" if param else e["msg"], param


# ---- generation -----------------------------------------------------------------------------------
@dataclass
class Job:
    """One chat request waiting for (or being) generated."""

    id: str
    system: str | None
    user: str
    history: list[dict]  # earlier turns (user/assistant) before the last user message
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stream: bool
    loop: asyncio.AbstractEventLoop | None = None  # set on the event loop, with future and deltas
    future: asyncio.Future | None = None
    deltas: asyncio.Queue | None = None  # streaming: text pieces as they are generated
    fingerprint: str = ""  # the version the job is answered with (set when its batch starts)
    prompt: str = ""  # the formatted prompt it was answered from (fast context included; set with fingerprint)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    fingerprint: str


def _deliver(job: Job, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on the job's event loop (``fn`` is a method of its queue or future)."""
    try:
        job.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is gone (shutdown)
        pass


def _resolve(job: Job, value: object) -> None:
    """Hand a job its answer on its event loop, unless it timed out or its client went away meanwhile."""

    def call() -> None:
        if not job.future.done():
            job.future.set_result(value)

    _deliver(job, call)


class _RowStreamer(BaseStreamer):
    """transformers calls ``put`` with the prompt first, then each step's new token of every row."""

    def __init__(self, jobs: list[Job], tokenizer, eos: int) -> None:
        self.jobs, self.tokenizer, self.eos = jobs, tokenizer, eos
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.done = [job.deltas is None for job in jobs]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if token == self.eos or len(self.ids[i]) >= self.jobs[i].max_tokens:
                self.done[i] = True
                continue
            self.ids[i].append(token)
            text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
            if len(text) > len(self.sent[i]) and not text.endswith("\ufffd"):  # a whole character only
                _deliver(self.jobs[i], self.jobs[i].deltas.put_nowait, text[len(self.sent[i]):])
                self.sent[i] = text

    def end(self) -> None:
        pass


class Generator:
    """The thread that owns generation with the served weights: bounded queue in, batches out."""

    def __init__(self, served: Served, cfg: Config, on_batch: Callable[[list[Job], list[Answer]], None]) -> None:
        self.served, self.cfg, self.on_batch = served, cfg, on_batch
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.serve.max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastslow-generate", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"server busy: {self.queue.maxsize} requests already waiting; retry later",
                           "rate_limit_error", "queue_full") from None

    def _take(self) -> list[Job]:
        try:
            jobs = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.perf_counter() + self.cfg.serve.batch_wait_ms / 1000
        while len(jobs) < self.cfg.serve.max_batch:
            left = deadline - time.perf_counter()
            try:
                jobs.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if not j.future.done()]  # a client that went away is not generated for

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take()
            if not jobs:
                continue
            groups: dict[tuple[float, float], list[Job]] = collections.defaultdict(list)
            for job in jobs:  # one generate call per sampling setting
                groups[(job.temperature, job.top_p)].append(job)
            for (temperature, top_p), group in groups.items():
                try:
                    answers = self._generate(group, temperature, top_p)
                except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
                    for job in group:
                        _resolve(job, ApiError(
                            500, f"generation failed: {type(exc).__name__}: {one_line(exc, 200)}", "server_error"))
                    continue
                try:
                    self.on_batch(group, answers)  # stores the answers (--learn) before the clients see them
                except Exception as exc:  # noqa: BLE001
                    answers = [ApiError(503, f"could not store the answer: {one_line(exc, 200)}", "server_error")
                               ] * len(group)
                for job, answer in zip(group, answers, strict=True):
                    _resolve(job, answer)
            self.batches += 1

    def _generate(self, jobs: list[Job], temperature: float, top_p: float) -> list[Answer]:
        served = self.served
        with served.lock:  # the version read here is the one every answer of the batch comes from
            policy, fingerprint = served.policy, served.fingerprint
            for job in jobs:
                job.fingerprint = fingerprint
                job.prompt = format_prompt(policy.tokenizer, served.system_for(job.user, job.system), job.history,
                                           job.user)
            prompts = [job.prompt for job in jobs]
            streamer = None
            if any(j.deltas is not None for j in jobs):
                streamer = _RowStreamer(jobs, policy.tokenizer, policy.tokenizer.eos_token_id)
            batch = policy.generate(prompts, temperature=temperature, top_p=top_p, seed=jobs[0].seed,
                                    max_new_tokens=max(j.max_tokens for j in jobs), streamer=streamer)
        answers = []
        eos = policy.tokenizer.eos_token_id
        for i, job in enumerate(jobs):
            n = int(batch.completion_mask[i].sum())
            ids = batch.completion_ids[i, :n].tolist()
            ended = bool(ids) and ids[-1] == eos
            ids = ids[:-1] if ended else ids
            # The batch may generate past this job's max_tokens: an eos after them would not have been reached.
            stopped = ended and len(ids) < job.max_tokens
            ids = ids[: job.max_tokens]
            text = policy.tokenizer.decode(ids, skip_special_tokens=True)
            answers.append(Answer(text, int(batch.prompt_mask[i].sum()), len(ids) + int(stopped),
                                  "stop" if stopped else "length", fingerprint))
        return answers


def format_prompt(tokenizer, system: str, history: list[dict], user: str) -> str:
    """The prompt text of a conversation: the chat template when the tokenizer has one, else plain turns."""
    messages = ([{"role": "system", "content": system}] if system else []) + history + [
        {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['content']}\n\n" for m in messages[:-1]) + f"{user}\n"


# ---- metrics --------------------------------------------------------------------------------------
class ServeMetrics:
    """Prometheus metrics of one server (their own registry: several servers in one process do not clash)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastslow_serve_requests", "HTTP requests by route and status", ["route", "code"],
                                registry=r)
        self.latency = Histogram("fastslow_serve_request_seconds", "Request latency (chat: until the last byte)",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("fastslow_serve_queue_depth", "Chat requests waiting for generation", registry=r)
        self.batch_size = Histogram("fastslow_serve_batch_size", "Requests per generation batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.weights_version = Gauge("fastslow_serve_weights_version", "Promotions of the served weights", registry=r)
        self.context_version = Gauge("fastslow_serve_context_version", "Changes of the served fast context",
                                     registry=r)
        self.kl_rev = Gauge("fastslow_serve_kl_rev", "Served weights' exact KL(pi||base) per token (probe set)",
                            registry=r)
        self.feedback = Counter("fastslow_serve_feedback", "Feedback stored, by source", ["source"], registry=r)
        self.gates = Counter("fastslow_serve_candidates", "Candidates gated, by outcome", ["outcome"], registry=r)


# ---- the app --------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 (by Content-Length, or counted as it arrives).

    The body (at most ``limit`` bytes) is read whole before the app runs and handed to it in one message, so an
    oversize chunked body never reaches a route."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_body(413, f"request body over serve.max_body_bytes ({self.limit} bytes)",
                               code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client's disconnect, as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class ServerState:
    """Everything the routes share: the served version, the generator, the store, the metrics."""

    def __init__(self, cfg: Config, served: Served, store: FeedbackStore, *, learn: bool, api_key: str | None,
                 problems: dict[str, Problem]) -> None:
        self.cfg, self.served, self.store, self.learn, self.api_key = cfg, served, store, learn, api_key
        self.scrub = lambda text: redact(text).replace(api_key, "***") if api_key else redact(text)  # stored text
        self.problems = problems  # user turn -> problem of the served task (server-side verifier, problem ids)
        self.metrics = ServeMetrics()
        self.generator = Generator(served, cfg, self._after_batch)
        self.tokenizer = copy.deepcopy(served.policy.tokenizer)  # HTTP threads count tokens with their own copy
        self.tokenizer_lock = threading.Lock()
        self.arrivals: collections.deque[float] = collections.deque(maxlen=100_000)
        self.started = int(time.time())
        self.learner = None

    def rate(self) -> float:
        """Chat requests per second over the last serve.idle_window_s."""
        window = self.cfg.serve.idle_window_s
        now, count = time.monotonic(), 0
        for t in reversed(self.arrivals):  # newest first: stop at the first one outside the window
            if now - t > window:
                break
            count += 1
        return count / window

    def _after_batch(self, jobs: list[Job], answers: list[Answer]) -> None:
        """Count the batch; with --learn store its answers (and verdicts) before any client sees them."""
        self.metrics.batch_size.observe(len(jobs))
        if not self.learn:
            return
        task = self.served.task
        rows, verdicts = [], []
        for job, answer in zip(jobs, answers, strict=True):
            problem = self.problems.get(job.user.strip())
            rows.append((job.id, task.name, problem.id if problem else None, self.scrub(job.prompt),
                         self.scrub(answer.text), answer.finish_reason == "stop", answer.fingerprint,
                         self.scrub(job.user)))
            if problem is not None and self.cfg.serve.score == "verifier":
                verdicts.append((job.id, problem, answer.text))
        self.store.add_answers(rows)
        for answer_id, problem, text in verdicts:
            verdict, _ = safe_verify(task, problem, text, timeout_s=self.cfg.verify_timeout_s)
            if self.store.add_feedback(answer_id, verdict.reward, self.scrub(verdict.feedback), "verifier") == "ok":
                self.metrics.feedback.labels("verifier").inc()

    def sync_gauges(self) -> None:
        st = self.served.state
        self.metrics.queue_depth.set(self.generator.queue.qsize())
        self.metrics.weights_version.set(st.weights_version)
        self.metrics.context_version.set(st.context_version)
        self.metrics.kl_rev.set(st.kl_rev)


def create_app(state: ServerState) -> FastAPI:
    scfg = state.cfg.serve
    app = FastAPI(title="fastslow serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_body(exc.status, exc.message, exc.kind, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_body(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # pragma: no cover - a fastslow bug: one line, no traceback
        return error_body(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        t0 = time.perf_counter()
        route = request.url.path if request.url.path in ROUTES else "other"
        if state.api_key is not None and request.url.path != "/healthz":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                response = error_body(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
                state.metrics.requests.labels(route, "401").inc()
                return response
        response = await call_next(request)
        state.metrics.requests.labels(route, str(response.status_code)).inc()
        if not response.headers.get("content-type", "").startswith("text/event-stream"):  # SSE: timed to the end
            state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "system_fingerprint": state.served.fingerprint}

    @app.get("/metrics")
    async def metrics():
        state.sync_gauges()
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": scfg.model_name, "object": "model", "created": state.started,
                                            "owned_by": "fastslow"}]}

    async def parse(request: Request, model: type[BaseModel]):
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise ApiError(400, message, code="invalid_value", param=param) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        req = await parse(request, ChatRequest)
        if req.model != scfg.model_name:
            raise ApiError(404, f"model {req.model[:100]!r} does not exist; this server serves {scfg.model_name!r}",
                           code="model_not_found", param="model")
        job = await asyncio.to_thread(make_job, state, req)  # tokenizing is not for the event loop
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        job.deltas = asyncio.Queue() if req.stream else None
        state.arrivals.append(time.monotonic())
        state.generator.submit(job)
        if not req.stream:
            answer = await wait_answer(job, scfg.request_timeout_s)
            return completion_body(job, answer, scfg.model_name)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream_chunks(state, job, include_usage, t0), media_type="text/event-stream")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        req = await parse(request, FeedbackRequest)
        if not state.learn:
            raise ApiError(400, "this server does not learn: start it with --learn to send feedback",
                           code="not_learning")
        text = state.scrub(req.text) if req.text is not None else None
        status = await asyncio.to_thread(state.store.add_feedback, req.id, req.reward, text, "feedback")
        if status == "unknown":
            raise ApiError(404, f"no answer with id {req.id[:128]!r}", code="unknown_id", param="id")
        if status == "duplicate":
            raise ApiError(409, f"feedback for {req.id[:128]!r} is already stored", code="duplicate", param="id")
        state.metrics.feedback.labels("feedback").inc()
        return {"id": req.id, "object": "feedback", "status": "stored"}  # durable: committed with synchronous=FULL

    return app


ROUTES = ("/healthz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/feedback")


def make_job(state: ServerState, req: ChatRequest) -> Job:
    """Check a chat request against the server's limits and turn it into a queued job."""
    scfg, cfg = state.cfg.serve, state.cfg
    *earlier, last = req.messages
    if last.role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    system_parts = [m.text() for m in earlier if m.role in ("system", "developer")]
    system = "\n\n".join(system_parts) if system_parts else None
    history = [{"role": m.role, "content": m.text()} for m in earlier if m.role in ("user", "assistant")]
    max_tokens = req.max_completion_tokens or req.max_tokens or scfg.default_max_tokens or cfg.slow.max_new_tokens
    if max_tokens > scfg.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {scfg.max_tokens}",
                       code="max_tokens_exceeded", param="max_tokens")
    served = state.served
    prompt = format_prompt(state.tokenizer, served.system_for(last.text(), system), history, last.text())
    with state.tokenizer_lock:
        n = len(state.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > scfg.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {n} tokens with the served context; this server's limit is "
                       f"{scfg.max_prompt_tokens}", code="context_length_exceeded", param="messages")
    temperature = 1.0 if req.temperature is None else req.temperature
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    seed = req.seed if req.seed is not None else derive_seed(cfg.seed, "serve", rid)
    return Job(rid, system, last.text(), history, max_tokens, temperature, req.top_p or 1.0, seed, req.stream)


async def wait_answer(job: Job, timeout: float) -> Answer:
    try:
        answer = await asyncio.wait_for(asyncio.shield(job.future), timeout)
    except asyncio.TimeoutError:  # noqa: UP041 - TimeoutError itself only from 3.11
        job.future.cancel()
        raise ApiError(503, f"no answer within serve.request_timeout_s ({timeout} s)", "server_error",
                       "timeout") from None
    if isinstance(answer, ApiError):
        raise answer
    return answer


def completion_body(job: Job, answer: Answer, model: str) -> dict:
    return {
        "id": job.id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": answer.fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": usage(answer),
    }


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


async def stream_chunks(state: ServerState, job: Job, include_usage: bool, t0: float):
    """SSE: a role chunk, the text as it is generated, a finish chunk, the usage chunk (if asked), [DONE]."""
    model = state.cfg.serve.model_name
    created = int(time.time())
    role_sent = False

    def chunk(delta: dict, finish: str | None = None) -> str:
        # The role chunk goes out with the first text or the answer: by then the batch has set the version.
        nonlocal role_sent
        if not role_sent:
            role_sent = True
            delta = {"role": "assistant", **delta}
        body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": job.fingerprint,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        sent = ""
        deadline = time.perf_counter() + state.cfg.serve.request_timeout_s
        while not job.future.done():
            try:
                piece = await asyncio.wait_for(job.deltas.get(), max(0.0, min(0.05, deadline - time.perf_counter())))
            except asyncio.TimeoutError:  # noqa: UP041 - TimeoutError itself only from 3.11
                if time.perf_counter() > deadline:
                    job.future.cancel()
                    yield f"data: {json.dumps({'error': {'message': 'no answer in time', 'type': 'server_error'}})}\n\n"
                    return
                continue
            sent += piece
            yield chunk({"content": piece})
        answer = job.future.result()
        if isinstance(answer, ApiError):
            yield f"data: {json.dumps({'error': {'message': answer.message, 'type': answer.kind}})}\n\n"
            return
        while not job.deltas.empty():
            piece = job.deltas.get_nowait()
            sent += piece
            yield chunk({"content": piece})
        fingerprint = answer.fingerprint
        if not role_sent:
            yield chunk({"content": ""})
        if answer.text.startswith(sent) and len(answer.text) > len(sent):  # text the streamer did not emit
            yield chunk({"content": answer.text[len(sent):]})
        yield chunk({}, answer.finish_reason)
        if include_usage:
            body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": [], "usage": usage(answer)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        state.metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - t0)
