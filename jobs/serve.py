"""`raygpt serve CKPT [CKPT ...]`: checkpoints behind Ray Serve with an OpenAI-compatible HTTP API.

Topology (docs/SERVING.md): one FastAPI *ingress* deployment (auth, body limits, validation, SSE, metrics,
timeouts, retries) holds a `DeploymentHandle` per checkpoint; each checkpoint is its own *model* deployment
(`model-<name>`) with its own autoscaling, chosen by the request's `model` field. One deployment per model
rather than Serve multiplexing: a handful of small checkpoints all stay loaded, and each scales on its own load.

A model replica tokenizes and checks the prompt (an error comes back as a value and becomes a 400), then the
request joins `@serve.batch`: requests arriving within `batch_wait_timeout_s`, or queued while the previous
batch decoded, are decoded together by the batched KV-cached sampler (jobs/serve_engine.py). Streaming and
non-streaming requests share the batch. Decoding runs on one worker thread so the replica's event loop keeps
accepting requests into the next batch meanwhile.

Also `serve run jobs.serve:app models=runs/sft/checkpoint` (an application builder).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at run time.

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics as serve_metrics
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.exceptions import HTTPException

from jobs.config import ConfigError, field, from_dict, help_lines, load_config, to_dict
from jobs.serve_api import (
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

API_KEY_ENV = "RAYGPT_API_KEY"


@dataclass
class HttpConfig:
    host: str = field("127.0.0.1", help="HTTP bind address; anything but loopback exposes the API to the network")
    port: int = field(8000, help="HTTP port")
    route_prefix: str = field("/", help="URL prefix of the application")
    api_key_file: str | None = field(None, help=f"file holding the API key (else ${API_KEY_ENV}; neither: no auth)")
    ingress_replicas: int = field(1, help="ingress (FastAPI) replicas")
    ingress_max_ongoing_requests: int = field(256, help="concurrent requests one ingress replica accepts")


@dataclass
class BatchingConfig:
    max_batch_size: int = field(32, help="most sampler rows (prompts × n) one model replica decodes together")
    batch_wait_timeout_s: float = field(0.01, help="how long a batch waits to fill after its first request")


@dataclass
class ScalingConfig:
    min_replicas: int = field(1, help="model replicas at least (per model)")
    max_replicas: int = field(1, help="model replicas at most; > min_replicas turns on Serve autoscaling")
    initial_replicas: int | None = field(None, help="replicas at start (default min_replicas)")
    target_ongoing_requests: float = field(16.0, help="autoscaling target of in-flight requests per replica")
    upscale_delay_s: float = field(3.0, help="load must stay high this long before adding a replica")
    downscale_delay_s: float = field(30.0, help="load must stay low this long before removing a replica")
    max_ongoing_requests: int = field(0, help="in-flight requests per model replica (0 = 2 × max_batch_size)")
    num_cpus: float = field(1.0, help="CPUs reserved per model replica")
    num_gpus: float = field(0.0, help="GPUs per model replica")
    torch_threads: int = field(0, help="torch intra-op threads per replica (0 = max(1, num_cpus))")


@dataclass
class LimitsConfig:
    max_tokens: int = field(256, help="largest max_tokens a request may ask for")
    default_max_tokens: int = field(16, help="max_tokens when a request leaves it unset (OpenAI's default)")
    max_choices: int = field(16, help="most completions per request (number of prompts × n)")
    max_body_bytes: int = field(1 << 20, help="largest request body; larger → 413")
    request_timeout_s: float = field(60.0, help="per-request deadline; past it → 408 (streams: an error event)")
    retries: int = field(2, help="re-sends of a request whose model replica died before answering")


@dataclass
class ServeConfig:
    """Serve checkpoints behind Ray Serve: OpenAI-compatible /v1/completions (+ chat), streaming, dynamic
    batching, autoscaling, optional API key. Positional arguments are checkpoint directories, `name=path` or
    `path` (name = the directory's name, or its run's name for runs/<name>/checkpoint)."""

    models: list[str] = field([], help="checkpoints to serve: PATH or NAME=PATH (positional arguments win)")
    default_model: str | None = field(None, help="model used when a request names none (default: the first)")
    app_name: str = field("raygpt", help="Serve application name")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded 127.0.0.1)")
    num_cpus: int | None = field(None, help="logical CPUs of the embedded Ray cluster (default: all)")
    http: HttpConfig = field(HttpConfig(), help="HTTP front end")
    batching: BatchingConfig = field(BatchingConfig(), help="dynamic batching (@serve.batch)")
    scaling: ScalingConfig = field(ScalingConfig(), help="model replicas and autoscaling")
    limits: LimitsConfig = field(LimitsConfig(), help="request limits")

    def validate(self) -> None:
        b, s, lim = self.batching, self.scaling, self.limits
        checks = [
            ("http.port", 0 < self.http.port < 65536, "must be in 1..65535"),
            ("http.ingress_replicas", self.http.ingress_replicas >= 1, "must be >= 1"),
            ("batching.max_batch_size", b.max_batch_size >= 1, "must be >= 1"),
            ("batching.batch_wait_timeout_s", b.batch_wait_timeout_s >= 0, "must be >= 0"),
            ("scaling.min_replicas", 0 <= s.min_replicas <= s.max_replicas, "must be in 0..scaling.max_replicas"),
            ("scaling.max_replicas", s.max_replicas >= 1, "must be >= 1"),
            ("scaling.initial_replicas", s.initial_replicas is None
             or s.min_replicas <= s.initial_replicas <= s.max_replicas, "must be within [min, max]_replicas"),
            ("limits.max_tokens", lim.max_tokens >= 1, "must be >= 1"),
            ("limits.default_max_tokens", 1 <= lim.default_max_tokens <= lim.max_tokens,
             "must be in 1..limits.max_tokens"),
            # @serve.batch counts rows (batch_size_fn); one request must fit one batch.
            ("limits.max_choices", 1 <= lim.max_choices <= b.max_batch_size, "must be in 1..batching.max_batch_size"),
            ("limits.max_body_bytes", lim.max_body_bytes >= 1024, "must be >= 1024"),
            ("limits.request_timeout_s", lim.request_timeout_s > 0, "must be > 0"),
            ("limits.retries", lim.retries >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why}")


def model_specs(items: list[str]) -> dict[str, Path]:
    """`PATH` or `NAME=PATH` → {name: absolute checkpoint dir}; ConfigError naming the bad item."""
    from models.checkpoint import CheckpointError, read_config, tokenizer_path

    if not items:
        raise ConfigError("models: give at least one checkpoint directory (raygpt serve runs/<name>/checkpoint)")
    out: dict[str, Path] = {}
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        p = Path(path if sep else item).expanduser().resolve()
        if not sep:
            name = p.parent.name if p.name == "checkpoint" else p.name
        if not name or any(c in name for c in "/#?& ") or name in out:
            raise ConfigError(f"models[{i}]: {'duplicate' if name in out else 'invalid'} model name {name!r}; "
                              "use NAME=PATH with a unique name")
        try:
            _, kind, _ = read_config(p)
            tokenizer_path(p)
        except CheckpointError as e:
            raise ConfigError(f"models[{i}]: {e}") from None
        if kind != "lm":
            raise ConfigError(f"models[{i}]: {p} is a {kind} model; only language models can be served")
        out[name] = p
    return out


def api_key_sha256(cfg: ServeConfig) -> str | None:
    """SHA-256 of the API key (file from the config, else $RAYGPT_API_KEY). Only the hash travels to the
    ingress replicas, so the key never appears in Ray's deployment metadata, logs or the command line."""
    if cfg.http.api_key_file:
        p = Path(cfg.http.api_key_file).expanduser()
        try:
            key = p.read_text().strip()
        except OSError as e:
            raise ConfigError(f"http.api_key_file: cannot read {p} ({e.strerror})") from None
        if not key:
            raise ConfigError(f"http.api_key_file: {p} is empty")
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def bind_replica_grpc_to_loopback() -> None:
    """Ray Serve 2.60 replicas open an internal gRPC server on [::] with no setting (shared/ENVIRONMENT.md).
    Rebind it to 127.0.0.1 before the replica starts it; fail closed if Serve no longer has the hook."""
    from ray.serve._private import replica

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

    choices: list[ChoiceDelta] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    error: dict[str, Any] | None = None  # ApiError fields when the request cannot be served


def _rows(items: list[tuple[Job, list[list[int]]]]) -> int:
    return sum(len(prompts) * job.n for job, prompts in items)


@serve.deployment(name="model")
class ModelServer:
    """One checkpoint: tokenize + check, then decode in batches (see module docstring)."""

    def __init__(self, name: str, path: str, batching: dict[str, Any], torch_threads: int) -> None:
        bind_replica_grpc_to_loopback()
        import torch  # here, not at the top: the ingress replicas never need torch (~250 MB each)

        from jobs.serve_engine import Engine

        torch.set_num_threads(max(1, torch_threads))
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.engine = Engine.from_checkpoint(path, name, max_rows=batching["max_batch_size"], device=device)
        self._batched.set_max_batch_size(batching["max_batch_size"])
        self._batched.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode")  # one batch decodes at a time
        self._m_rows = serve_metrics.Histogram("raygpt_batch_rows", "sampler rows per decoded batch",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))
        self._m_tokens = serve_metrics.Counter("raygpt_generated_tokens", "tokens generated", tag_keys=("model",))
        self._m_tps = serve_metrics.Gauge("raygpt_batch_tokens_per_second", "tokens/s of the last batch",
                                          tag_keys=("model",))
        for m in (self._m_rows, self._m_tokens, self._m_tps):
            m.set_default_tags({"model": name})  # a fresh dict each time: Serve adds its own tags to it

    def info(self) -> dict[str, Any]:
        return {"name": self.engine.name, "n_ctx": self.engine.n_ctx, "vocab_size": self.engine.vocab}

    def _prepare(self, job: Job) -> tuple[list[list[int]] | None, dict[str, Any] | None]:
        try:
            return self.engine.tokenize(job), None
        except RequestError as e:
            return None, ApiError(400, e.message, e.param, e.code).body()["error"]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _batched(self, items: list[tuple[Job, list[list[int]]]]) -> AsyncIterator[list[Any]]:
        loop = asyncio.get_running_loop()
        steps = self.engine.steps([j for j, _ in items], [p for _, p in items])
        t0, n_tokens, end = time.perf_counter(), 0, object()
        self._m_rows.observe(_rows(items))
        while (out := await loop.run_in_executor(self._pool, next, steps, end)) is not end:
            n_tokens += sum(len(d.token_ids) for deltas in out for d in deltas or [])
            yield [StopIteration if d is None else d for d in out]
        self._m_tokens.inc(n_tokens)
        self._m_tps.set(n_tokens / max(time.perf_counter() - t0, 1e-9))

    def _with_tokens(self, job: Job, d: ChoiceDelta) -> ChoiceDelta:
        if job.logprobs is not None:
            d.tokens = [self.engine.token_str(t) for t in d.token_ids]
        return d

    async def complete(self, job: Job) -> Reply:
        prompts, error = self._prepare(job)
        if prompts is None:
            return Reply(error=error)
        acc: dict[int, ChoiceDelta] = {}
        async for deltas in self._batched((job, prompts)):
            for d in deltas:
                if d.index in acc:
                    acc[d.index].merge(d)
                else:
                    acc[d.index] = d
        choices = [self._with_tokens(job, acc[i]) for i in sorted(acc)]
        if job.logprobs:
            loop = asyncio.get_running_loop()
            for c in choices:
                c.top_logprobs = await loop.run_in_executor(
                    self._pool, self.engine.top_logprobs, prompts[c.index // job.n], c.token_ids, job.logprobs,
                    job.temperature)
        return Reply(choices, sum(len(p) for p in prompts))

    async def complete_stream(self, job: Job) -> AsyncIterator[Any]:
        """First item: Reply(prompt_tokens) or Reply(error); then lists of ChoiceDelta."""
        prompts, error = self._prepare(job)
        if prompts is None:
            yield Reply(error=error)
            return
        yield Reply(prompt_tokens=sum(len(p) for p in prompts))
        async for deltas in self._batched((job, prompts)):
            if deltas:
                yield [self._with_tokens(job, d) for d in deltas]


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


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict[str, Any], limits: dict[str, Any], key_sha256: str | None,
                 default_model: str | None) -> None:
        bind_replica_grpc_to_loopback()
        self.models = models
        self.lim = LimitsConfig(**limits)
        self.key = bytes.fromhex(key_sha256) if key_sha256 else None
        self.default = default_model or next(iter(models))
        self.created = int(time.time())
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
        # A server-chosen seed when the client gives none: a retry after a replica death repeats the sample.
        seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
        return name, Job(prompts, req.n, max_tokens, req.temperature, req.top_p, seed, req.stops(), req.logprobs)

    def _deadline_left(self, t0: float) -> float:
        left = self.lim.request_timeout_s - (time.perf_counter() - t0)
        if left <= 0:
            raise ApiError(408, f"request timed out after {self.lim.request_timeout_s:g} s "
                                "(limits.request_timeout_s)", None, "timeout", "timeout_error")
        return left

    async def _call(self, name: str, job: Job, t0: float) -> Reply:
        for attempt in range(self.lim.retries + 1):
            response = self.models[name].complete.remote(job)
            try:
                return await asyncio.wait_for(response, self._deadline_left(t0))
            except asyncio.TimeoutError:
                response.cancel()
                self._deadline_left(t0 + self.lim.request_timeout_s)  # raises the 408
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
                return await self._stream(endpoint, model, job, req, chat, t0)
            reply = await self._call(model, job, t0)
            if reply.error:
                raise ApiError(400, **reply.error)
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

    async def _stream(self, endpoint: str, model: str, job: Job, req: CompletionRequest, chat: bool,
                      t0: float) -> Response:
        # Open the model stream and read its first item (accepted / error) before answering, so a prompt
        # the model rejects still gets a 400 status rather than an error inside a 200 event stream.
        for attempt in range(self.lim.retries + 1):
            gen = self.models[model].options(stream=True).complete_stream.remote(job)
            try:
                head: Reply = await asyncio.wait_for(gen.__anext__(), self._deadline_left(t0))
                break
            except asyncio.TimeoutError:
                gen.cancel()
                self._deadline_left(t0 + self.lim.request_timeout_s)
            except RETRYABLE:
                if attempt == self.lim.retries:
                    raise
        if head.error:
            raise ApiError(400, **head.error)
        cid, created = new_id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body = {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return sse(to_chat(body, chunk=True) if chat else body)

        async def events() -> AsyncIterator[str]:
            n_tokens, rows, status = 0, 0, 200
            try:
                while True:
                    try:
                        deltas = await asyncio.wait_for(gen.__anext__(), self._deadline_left(t0))
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        gen.cancel()
                        self._deadline_left(t0 + self.lim.request_timeout_s)
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
            self._observe(endpoint, model, status, t0, head, n_tokens, rows)

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



def build_app(cfg: ServeConfig) -> Any:
    """The Serve application for `cfg` (checkpoints checked here, before anything is deployed)."""
    specs = model_specs(cfg.models)
    if cfg.default_model is not None and cfg.default_model not in specs:
        raise ConfigError(f"default_model: {cfg.default_model!r} is not one of {list(specs)}")
    s = cfg.scaling
    scaling: dict[str, Any]
    if s.max_replicas > s.min_replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "initial_replicas": s.initial_replicas if s.initial_replicas is not None else max(1, s.min_replicas),
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s}}
    else:
        scaling = {"num_replicas": s.max_replicas}
    ongoing = s.max_ongoing_requests or 2 * cfg.batching.max_batch_size
    threads = s.torch_threads or max(1, int(s.num_cpus))
    handles = {
        name: ModelServer.options(name=f"model-{name}", max_ongoing_requests=ongoing,
                             ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}, **scaling)
        .bind(name, str(path), dataclasses.asdict(cfg.batching), threads)
        for name, path in specs.items()
    }
    return Ingress.options(
        num_replicas=cfg.http.ingress_replicas, max_ongoing_requests=cfg.http.ingress_max_ongoing_requests,
    ).bind(handles, dataclasses.asdict(cfg.limits), api_key_sha256(cfg), cfg.default_model)


def app(args: dict[str, str]) -> Any:
    """Application builder for `serve run jobs.serve:app models=a,b [config=serve.yaml] [scaling.max_replicas=2]`.
    HTTP host/port then come from `serve run`/Serve's own settings (default 127.0.0.1:8000)."""
    args = dict(args)
    path = args.pop("config", None)
    models = args.pop("models", None)
    cfg = load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()])
    if models:
        cfg = from_dict(ServeConfig, {**to_dict(cfg), "models": models.split(",")})
    return build_app(cfg)


def plan(cfg: ServeConfig) -> str:
    specs = model_specs(cfg.models)
    s, b = cfg.scaling, cfg.batching
    reps = f"{s.min_replicas}..{s.max_replicas} (autoscaling)" if s.max_replicas > s.min_replicas else s.max_replicas
    lines = [f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}/v1  "
             f"(ingress × {cfg.http.ingress_replicas}, api key: {'on' if api_key_sha256(cfg) else 'off'})"]
    lines += [f"  model-{n}: {p}  replicas {reps}, {s.num_cpus:g} CPU each, batch ≤ {b.max_batch_size} rows "
              f"/ {b.batch_wait_timeout_s:g} s" for n, p in specs.items()]
    return "\n".join(lines)


def run(cfg: ServeConfig) -> None:
    """Deploy and block until SIGINT/SIGTERM."""
    from cluster.runtime import init_ray, is_embedded, shutdown_ray

    application = build_app(cfg)  # checks checkpoints and the key before starting Ray
    if cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {cfg.http.host}: the API is reachable from the network", file=sys.stderr)
    num_cpus = cfg.num_cpus
    if num_cpus is None and is_embedded(cfg.address):  # logical CPUs: never fewer than the replicas reserve
        s = cfg.scaling
        start = s.initial_replicas if s.initial_replicas is not None else max(1, s.min_replicas)
        num_cpus = max(os.cpu_count() or 1, math.ceil(len(cfg.models) * start * s.num_cpus))
    state = {"serving": False, "stop": False}

    def _on_signal(*_: Any) -> None:
        if not state["serving"]:  # still starting (serve.run may wait on resources): interrupt it
            raise KeyboardInterrupt
        state["stop"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    init_ray(cfg.address, num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(application, name=cfg.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
        state["serving"] = True
        print(plan(cfg), flush=True)
        print("serving; Ctrl-C to stop", flush=True)
        while not state["stop"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("interrupted during start-up", file=sys.stderr)
    finally:
        state["serving"] = True  # a second signal during clean-up must not interrupt it
        print("stopping", flush=True)
        if is_embedded(cfg.address):
            serve.shutdown()
            shutdown_ray()
        else:
            serve.delete(cfg.app_name)


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(
        prog="raygpt serve", description=(ServeConfig.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in YAML or with --set NAME=VALUE):\n" + "\n".join(help_lines(ServeConfig))
        + f"\n\nAPI key: ${API_KEY_ENV} or http.api_key_file (never on the command line).",
    )
    parser.add_argument("checkpoints", nargs="*", help="checkpoint directories: PATH or NAME=PATH")
    parser.add_argument("--config", help="YAML file with config fields (e.g. configs/serve.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan; start nothing")
    args = parser.parse_args(argv)
    sets = list(args.set) + [f"http.host={args.host}"] * bool(args.host) + [f"http.port={args.port}"] * bool(args.port)
    try:
        cfg = load_config(ServeConfig, args.config, sets)
        if args.checkpoints:
            cfg = from_dict(ServeConfig, {**to_dict(cfg), "models": list(args.checkpoints)})
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            print("# placement plan")
            print(plan(cfg))
            return 0
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
