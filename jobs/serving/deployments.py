"""Ray Serve deployments of `raygpt serve`: the FastAPI ingress and the per-checkpoint model server.

Topology (docs/SERVING.md): one *ingress* deployment (auth, body limit, validation, SSE, metrics, timeouts,
retries) holds a `DeploymentHandle` per checkpoint; each checkpoint is its own *model* deployment
(`model-<name>`) with its own replicas and autoscaling, chosen by the request's `model` field. One deployment
per model rather than Serve multiplexing: a handful of small checkpoints all stay loaded, and each scales on
its own load. jobs/serving/app.py builds the application from the config.

Longer than 400 lines because the two deployments share one request life cycle (limits, the error mapping to
OpenAI's shape, retries on a lost replica, stream bookkeeping) that reads best in one place.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at run time.

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics as serve_metrics
from ray.serve._private import replica
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.exceptions import HTTPException

from jobs.config import field
from jobs.serving.api import (
    TOO_LARGE,
    ApiError,
    ChatRequest,
    ChoiceDelta,
    CompletionRequest,
    Job,
    RequestError,
    completion_json,
    decode_json,
    logprobs_json,
    new_id,
    parse,
    sse,
    to_chat,
    usage_json,
)
from jobs.serving.openapi import openapi_spec


@dataclass
class LimitsConfig:
    max_tokens: int = field(256, help="largest max_tokens a request may ask for")
    default_max_tokens: int = field(16, help="max_tokens when a request leaves it unset (OpenAI's default)")
    max_choices: int = field(16, help="most completions per request (number of prompts × n)")
    max_body_bytes: int = field(1 << 20, help="largest request body; larger → 413")
    max_prompt_tokens: int = field(0, help="most prompt tokens over all prompts of a request; more → 413 "
                                           "(0 = only the model's context bounds each prompt)")
    max_request_tokens: int = field(0, help="most completion tokens a request may ask for, prompts × n × "
                                            "max_tokens; more → 413 (0 = max_choices × max_tokens)")
    max_streams_per_key: int = field(0, help="concurrent streams one API key (or, without auth, all clients) may "
                                             "hold open per ingress replica; more → 429 (0 = no limit)")
    request_timeout_s: float = field(60.0, help="per-request deadline; past it → 408 (streams: an error event)")
    retries: int = field(2, help="re-sends of a request whose model replica died before answering")


def bind_replica_grpc_to_loopback() -> None:
    """Ray Serve 2.60 replicas open an internal gRPC server on [::] with no setting (docs/ARCHITECTURE.md).
    Rebind it to 127.0.0.1 before the replica starts it; fail closed if Serve no longer has the hook."""

    orig = getattr(replica, "add_port_to_grpc_server", None)
    if orig is None:
        raise RuntimeError("ray.serve._private.replica.add_port_to_grpc_server is gone: cannot keep the replica's "
                           "gRPC server on loopback, refusing to start (update jobs/serve.py for this Ray)")
    if getattr(orig, "_raygpt_loopback", False):
        return

    def loopback(server: Any, address: str) -> int:
        return orig(server, "127.0.0.1:" + address.rpartition(":")[2])

    loopback._raygpt_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


@dataclass
class Reply:
    """What a model replica answers for one request (non-streaming)."""

    choices: list[ChoiceDelta] = dc_field(default_factory=list)
    prompt_tokens: int = 0
    error: dict[str, Any] | None = None  # ApiError fields when the request cannot be served


def _rows(items: list[tuple[Job, list[list[int]]]]) -> int:
    return sum(len(prompts) * job.n for job, prompts in items)


_END = object()  # end of one request's stream of deltas (in-process only)
Item = tuple[Job, list[list[int]]]  # a request with its tokenized prompts


class CompletionReplica:
    """What a model replica does with a request whatever decodes it (the native `ModelServer`, the vLLM server):
    tokenize and check it (400 before any decoding), merge the decoded deltas into choices or stream them.
    Subclasses set `codec` (a batcher.TextCodec) and implement `_deltas(job, prompts)`."""

    codec: Any

    def _deltas(self, job: Job, prompts: list[list[int]]) -> AsyncIterator[list[ChoiceDelta]]:
        raise NotImplementedError

    def _finish(self, job: Job, prompts: list[list[int]], choices: list[ChoiceDelta]) -> None:
        """Last touch on a non-streamed reply's choices (e.g. the native server's top log-probs)."""

    def _prepare(self, job: Job) -> tuple[list[list[int]] | None, dict[str, Any] | None]:
        try:
            return self.codec.tokenize(job), None
        except RequestError as e:
            return None, ApiError(400, e.message, e.param, e.code).body()["error"]

    def _with_tokens(self, job: Job, d: ChoiceDelta) -> ChoiceDelta:
        if job.logprobs is not None:
            d.tokens = [self.codec.token_str(t) for t in d.token_ids]
        return d

    async def complete(self, job: Job) -> Reply:
        prompts, error = self._prepare(job)
        if prompts is None:
            return Reply(error=error)
        acc: dict[int, ChoiceDelta] = {}
        async for deltas in self._deltas(job, prompts):
            for d in deltas:
                if d.index in acc:
                    top = d.top_logprobs
                    acc[d.index].merge(d)
                    acc[d.index].top_logprobs = top if top is not None else acc[d.index].top_logprobs
                else:
                    acc[d.index] = d
        choices = [self._with_tokens(job, acc[i]) for i in sorted(acc)]
        self._finish(job, prompts, choices)
        return Reply(choices, sum(len(p) for p in prompts))

    async def complete_stream(self, job: Job) -> AsyncIterator[Any]:
        """First item: Reply(prompt_tokens) or Reply(error); then lists of ChoiceDelta (alternatives' log-probs
        only in non-streamed replies)."""
        prompts, error = self._prepare(job)
        if prompts is None:
            yield Reply(error=error)
            return
        yield Reply(prompt_tokens=sum(len(p) for p in prompts))
        async for deltas in self._deltas(job, prompts):
            for d in deltas:
                d.top_logprobs = None
            yield [self._with_tokens(job, d) for d in deltas]


@serve.deployment(name="model")
class ModelServer(CompletionReplica):
    """One checkpoint. A request is tokenized and checked, then queued through `@serve.batch`; one decode loop
    per replica runs the batched sampler over everything queued, step by step.

    Why a decode loop behind @serve.batch rather than decoding inside it: Serve forms the *next* batch while
    the current one runs (its concurrency semaphore is taken after the batch is formed), so requests arriving
    during a decode would leave as many small batches queued one behind the other (measured: 7 rows per
    batch under 32 clients instead of 20+). Here the batch function only hands its requests to the loop and
    returns; the loop merges every batch formed meanwhile into the next sampler call (≤ max_batch_size rows).
    Decoding runs on the replica's event loop and yields after each step, so streamed tokens flush and new
    requests keep arriving; a worker thread would fight Serve's request handling for the GIL.
    """

    def __init__(self, name: str, path: str, batching: dict[str, Any], torch_threads: int) -> None:
        bind_replica_grpc_to_loopback()
        import torch  # here, not at the top: the ingress replicas never need torch (~250 MB each)

        from jobs.serving.batcher import Batcher  # lazy, as torch above: only model replicas load it

        torch.set_num_threads(max(1, torch_threads))
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.max_rows = batching["max_batch_size"]
        self.engine = self.codec = Batcher.from_checkpoint(path, name, max_rows=self.max_rows, device=device)
        self._enqueue.set_max_batch_size(self.max_rows)
        self._enqueue.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self._pending: deque[tuple[Item, asyncio.Queue]] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._m_rows = serve_metrics.Histogram("raygpt_batch_rows", "sampler rows per decoded batch",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))
        self._m_tokens = serve_metrics.Counter("raygpt_generated_tokens", "tokens generated", tag_keys=("model",))
        self._m_tps = serve_metrics.Gauge("raygpt_batch_tokens_per_second", "tokens/s of the last batch",
                                          tag_keys=("model",))
        for m in (self._m_rows, self._m_tokens, self._m_tps):
            m.set_default_tags({"model": name})  # a fresh dict each time: Serve adds its own tags to it

    def info(self) -> dict[str, Any]:
        return {"name": self.engine.name, "n_ctx": self.engine.n_ctx, "vocab_size": self.engine.vocab}

    # --- batching ------------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _enqueue(self, items: list[Item]) -> list[asyncio.Queue]:
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in items]
        self._pending.extend(zip(items, queues))
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())
        self._wake.set()
        return queues

    async def _decode_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                take, rows = [], 0
                while self._pending and (not take or rows + _rows([self._pending[0][0]]) <= self.max_rows):
                    take.append(self._pending.popleft())
                    rows += _rows([take[-1][0]])
                await self._decode(take, rows)

    async def _decode(self, take: list[tuple[Item, asyncio.Queue]], rows: int) -> None:
        open_ = [True] * len(take)
        t0, n_tokens = time.perf_counter(), 0
        self._m_rows.observe(rows)
        try:
            for out in self.engine.steps([job for (job, _), _ in take], [p for (_, p), _ in take]):
                for i, ((_, q), deltas) in enumerate(zip(take, out)):
                    if not open_[i]:
                        continue
                    if deltas is None:
                        open_[i] = False
                        q.put_nowait(_END)
                    elif deltas:
                        n_tokens += sum(len(d.token_ids) for d in deltas)
                        q.put_nowait(deltas)
                await asyncio.sleep(0)  # flush streams, admit new requests
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep the replica serving
            for i, (_, q) in enumerate(take):
                if open_[i]:
                    q.put_nowait(e)
            return
        for i, (_, q) in enumerate(take):
            if open_[i]:
                q.put_nowait(_END)
        self._m_tokens.inc(n_tokens)
        self._m_tps.set(n_tokens / max(time.perf_counter() - t0, 1e-9))

    async def _deltas(self, job: Job, prompts: list[list[int]]) -> AsyncIterator[list[ChoiceDelta]]:
        q = await self._enqueue((job, prompts))
        while (out := await q.get()) is not _END:
            if isinstance(out, Exception):
                raise out
            yield out

    def _finish(self, job: Job, prompts: list[list[int]], choices: list[ChoiceDelta]) -> None:
        for c in choices if job.logprobs else []:  # the alternatives: one forward pass per choice
            c.top_logprobs = self.engine.top_logprobs(prompts[c.index // job.n], c.token_ids, job.logprobs or 0,
                                                      job.temperature)


# FastAPI's own description would not show the request bodies (the endpoints parse them strictly themselves):
# /openapi.json serves one built from the pydantic schemas instead (jobs/serving/openapi.py).
api = FastAPI(title="raygpt", docs_url=None, redoc_url=None, openapi_url=None)
RETRYABLE = (RayActorError, ReplicaUnavailableError)  # the replica died or vanished before answering


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404/405 in OpenAI's shape
    return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))


@api.exception_handler(Exception)
async def _bug(_: Request, e: Exception) -> JSONResponse:
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))


class IngressServer:
    """The HTTP front end (a plain class: `Ingress` below is its Serve deployment). Holds one handle per model."""

    def __init__(self, models: dict[str, Any], limits: dict[str, Any], key_sha256: str | None,
                 default_model: str | None) -> None:
        bind_replica_grpc_to_loopback()
        self.models = models
        self.lim = LimitsConfig(**limits)
        self.key = bytes.fromhex(key_sha256) if key_sha256 else None
        self.default = default_model or next(iter(models))
        self.created = int(time.time())
        self.streams: dict[bytes, int] = {}  # open streams per API key hash (b"" without auth), this replica
        reg = self.registry = CollectorRegistry()
        self.m_req = Counter("raygpt_requests", "HTTP requests", ["endpoint", "model", "status"], registry=reg)
        self.m_lat = Histogram("raygpt_request_latency_seconds", "request latency", ["endpoint", "model"],
                               registry=reg, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.m_tok = Counter("raygpt_completion_tokens", "tokens generated", ["model"], registry=reg)
        self.m_ptok = Counter("raygpt_prompt_tokens", "prompt tokens", ["model"], registry=reg)
        self.m_tps = Histogram("raygpt_request_tokens_per_second", "completion tokens / latency, per request",
                               ["model"], registry=reg, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
        self.m_rows = Histogram("raygpt_batch_rows", "size of the sampler batch each request was decoded in",
                                ["model"], registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64, 128))

    # --- plumbing ----------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.key):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key")

    async def _json(self, request: Request) -> dict[str, Any]:
        limit = self.lim.max_body_bytes
        size = request.headers.get("content-length", "")
        too_big = ApiError(413, f"body: larger than {limit} bytes", None, "request_too_large")
        if size.isdigit() and int(size) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return decode_json(bytes(body))

    def _job(self, req: CompletionRequest) -> tuple[str, Job]:
        name = req.model or self.default
        if name not in self.models:
            raise ApiError(404, f"model: '{name}' does not exist; served models: {', '.join(self.models)}",
                           "model", "model_not_found")
        max_tokens = req.max_tokens or self.lim.default_max_tokens
        if max_tokens > self.lim.max_tokens:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit {self.lim.max_tokens}",
                           "max_tokens", "max_tokens_exceeded")
        prompts = req.prompts()
        if len(prompts) * req.n > self.lim.max_choices:
            raise ApiError(400, f"n: {len(prompts)} prompt(s) × n={req.n} completions is above this server's "
                                f"limit of {self.lim.max_choices}", "n", "too_many_choices")
        budget = len(prompts) * req.n * max_tokens
        if self.lim.max_request_tokens and budget > self.lim.max_request_tokens:
            raise ApiError(413, f"max_tokens: {len(prompts)} prompt(s) × n={req.n} × max_tokens={max_tokens} = "
                                f"{budget} completion tokens is above this server's limit of "
                                f"{self.lim.max_request_tokens} per request (limits.max_request_tokens)",
                           "max_tokens", "request_too_large")
        # A server-chosen seed when the client gives none: a retry after a replica death repeats the sample.
        seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
        return name, Job(prompts, req.n, max_tokens, req.temperature, req.top_p, seed, req.stops(), req.logprobs,
                         self.lim.max_prompt_tokens)

    def _timed_out(self) -> ApiError:
        return ApiError(408, f"request timed out after {self.lim.request_timeout_s:g} s (limits.request_timeout_s)",
                        None, "timeout", "timeout_error")

    def _deadline_left(self, t0: float) -> float:
        left = self.lim.request_timeout_s - (time.perf_counter() - t0)
        if left <= 0:
            raise self._timed_out()
        return left

    async def _call(self, name: str, job: Job, t0: float) -> Reply:
        for attempt in range(self.lim.retries + 1):
            response = self.models[name].complete.remote(job)
            try:
                return await asyncio.wait_for(response, self._deadline_left(t0))
            except asyncio.TimeoutError:
                response.cancel()
                raise self._timed_out() from None
            except RETRYABLE:
                if attempt == self.lim.retries:
                    raise
        raise AssertionError("unreachable")

    def _choice_json(self, d: ChoiceDelta, logprobs: int | None) -> dict[str, Any]:
        lp = None
        if logprobs is not None:
            lp = logprobs_json(d.tokens, d.token_logprobs, d.text_offset, d.top_logprobs if logprobs else None)
        return {"text": d.text, "index": d.index, "logprobs": lp, "finish_reason": d.finish_reason}

    def _observe(self, endpoint: str, model: str, status: int, t0: float, reply: Reply | None,
                 n_tokens: int = 0, rows: int = 0) -> None:
        dt = time.perf_counter() - t0
        self.m_req.labels(endpoint, model, str(status)).inc()
        self.m_lat.labels(endpoint, model).observe(dt)
        if reply is not None and reply.error is None:
            self.m_tok.labels(model).inc(n_tokens)
            self.m_ptok.labels(model).inc(reply.prompt_tokens)
            self.m_tps.labels(model).observe(n_tokens / max(dt, 1e-9))
            if rows:
                self.m_rows.labels(model).observe(rows)

    # --- endpoints ---------------------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool) -> Response:
        t0, endpoint, model = time.perf_counter(), request.url.path, "-"
        try:
            self._auth(request)
            data = await self._json(request)
            req = parse(ChatRequest, data).to_completion() if chat else parse(CompletionRequest, data)
            model, job = self._job(req)
            if req.stream:
                return await self._stream(endpoint, model, job, req, chat, t0, request)
            reply = await self._call(model, job, t0)
            if reply.error:
                raise ApiError(413 if reply.error.get("code") in TOO_LARGE else 400, **reply.error)
        except ApiError as e:
            self._observe(endpoint, model, e.status, t0, None)
            return error_response(e)
        except RETRYABLE as e:  # every retry met a dead replica: Serve is replacing it; the client may retry
            self._observe(endpoint, model, 503, t0, None)
            return error_response(ApiError(503, f"model replica unavailable ({type(e).__name__}); retry shortly",
                                           None, "replica_unavailable", "server_error"))
        except Exception as e:  # noqa: BLE001 - a bug: answer in OpenAI's shape, keep the replica serving
            self._observe(endpoint, model, 500, t0, None)
            return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
        n_tokens = sum(len(c.token_ids) for c in reply.choices)
        rows = max((c.batch_rows for c in reply.choices), default=0)
        body = completion_json(new_id("cmpl"), model, [self._choice_json(c, job.logprobs) for c in reply.choices],
                               reply.prompt_tokens, n_tokens)
        self._observe(endpoint, model, 200, t0, reply, n_tokens, rows)
        return JSONResponse(to_chat(body) if chat else body, headers={"x-raygpt-batch-rows": str(rows)})

    def _open_stream(self, request: Request) -> bytes:
        """Count a stream against its API key (limits.max_streams_per_key); 429 when the key has its fill. The
        count is per ingress replica: it bounds what one client can hold of this replica's memory and sockets."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        who = hashlib.sha256(token.strip().encode()).digest() if self.key is not None else b""
        limit = self.lim.max_streams_per_key
        if limit and self.streams.get(who, 0) >= limit:
            raise ApiError(429, f"too many concurrent streams for this API key (limit {limit}, "
                                "limits.max_streams_per_key); wait for one to finish", None, "too_many_streams",
                           "rate_limit_error")
        self.streams[who] = self.streams.get(who, 0) + 1
        return who

    def _close_stream(self, who: bytes) -> None:
        left = self.streams.get(who, 1) - 1
        if left > 0:
            self.streams[who] = left
        else:
            self.streams.pop(who, None)

    async def _stream(self, endpoint: str, model: str, job: Job, req: CompletionRequest, chat: bool,
                      t0: float, request: Request) -> Response:
        who = self._open_stream(request)
        try:
            response = await self._stream_open(endpoint, model, job, req, chat, t0, who)
        except BaseException:
            self._close_stream(who)
            raise
        return response

    async def _stream_open(self, endpoint: str, model: str, job: Job, req: CompletionRequest, chat: bool,
                           t0: float, who: bytes) -> Response:
        # Open the model stream and read its first item (accepted / error) before answering, so a prompt
        # the model rejects still gets a 400 status rather than an error inside a 200 event stream.
        for attempt in range(self.lim.retries + 1):
            gen = self.models[model].options(stream=True).complete_stream.remote(job)
            try:
                head: Reply = await asyncio.wait_for(gen.__anext__(), self._deadline_left(t0))
                break
            except asyncio.TimeoutError:
                gen.cancel()
                raise self._timed_out() from None
            except RETRYABLE:
                if attempt == self.lim.retries:
                    raise
        if head.error:
            gen.cancel()
            raise ApiError(413 if head.error.get("code") in TOO_LARGE else 400, **head.error)
        cid, created = new_id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return sse(to_chat(body, chunk=True) if chat else body)

        async def events() -> AsyncIterator[str]:
            n_tokens, rows, status, finished = 0, 0, 200, False
            try:
                try:
                    while True:
                        try:
                            deltas = await asyncio.wait_for(gen.__anext__(), self._deadline_left(t0))
                        except StopAsyncIteration:
                            break
                        except asyncio.TimeoutError:
                            gen.cancel()
                            raise self._timed_out() from None
                        for d in deltas:
                            n_tokens += len(d.token_ids)
                            rows = max(rows, d.batch_rows)
                            yield chunk([self._choice_json(d, job.logprobs)])
                    if include_usage:
                        yield chunk([], usage_json(head.prompt_tokens, n_tokens))
                except ApiError as e:  # headers are sent: report in-band, as OpenAI does
                    status = e.status
                    yield sse(e.body())
                except Exception as e:  # noqa: BLE001 - a dead replica mid-stream: tell the client, keep serving
                    status = 500
                    yield sse(ApiError(500, f"stream interrupted: {type(e).__name__}", type="server_error").body())
                yield sse("[DONE]")
                finished = True
                self._observe(endpoint, model, status, t0, head, n_tokens, rows)
            finally:  # also when the client went away mid-stream (the generator is closed or cancelled)
                self._close_stream(who)
                if not finished:
                    gen.cancel()  # free the model replica's side of the stream now, not at max_tokens

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [self._model_json(m) for m in self.models]}

    @api.get("/v1/models/{name}")
    async def get_model(self, name: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        if name not in self.models:
            raise ApiError(404, f"model: '{name}' does not exist", "model", "model_not_found")
        return self._model_json(name)

    def _model_json(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "raygpt"}

    @api.get("/openapi.json")
    async def openapi(self) -> Response:
        """The OpenAPI description of the endpoints above (unauthenticated: it holds no data)."""
        return JSONResponse(openapi_spec())

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 when every model deployment answers within 5 s (unauthenticated: for load balancers)."""
        try:
            await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self.models.values())), 5.0)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "reason": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(self.models)})

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._auth(request)
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")


# The ingress takes no CPU reservation: it only awaits handles.
Ingress = serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})(serve.ingress(api)(IngressServer))
