"""The serving application: its config, the checks done before anything starts (checkpoints, API key) and the
application builder (`build_app`, also `serve run jobs.serving.app:app models=runs/sft/checkpoint …`, e.g. from a
RayService). The deployments are in jobs/serving/deployments.py, the HTTP schema in jobs/serving/api.py, the
batched decoding in jobs/serving/batcher.py; the design in docs/SERVING.md."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import ConfigError, field, from_dict, load_config, to_dict
from jobs.serving.deployments import Ingress, LimitsConfig, ModelServer
from jobs.serving.vllm_server import VLLMModelServer
from models.checkpoint import CheckpointError, read_config, tokenizer_path

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
    look_back_period_s: float = field(30.0, help="window over which Serve averages in-flight requests to decide")
    max_ongoing_requests: int = field(0, help="in-flight requests per model replica (0 = 2 × max_batch_size)")
    num_cpus: float = field(1.0, help="CPUs reserved per model replica")
    num_gpus: float = field(0.0, help="GPUs per model replica")
    torch_threads: int = field(0, help="torch intra-op threads per replica (0 = max(1, num_cpus))")



@dataclass
class VLLMServeConfig:
    kv_cache_gib: float = field(1.0, help="vLLM's KV cache per model replica in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_num_seqs: int = field(64, help="most choices vLLM decodes together per replica")
    enforce_eager: bool = field(True, help="skip vLLM's torch.compile (~6 s start instead of ~19 s; compiled "
                                            "decodes ~1.4x faster)")


ENGINES = ("native", "vllm")


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
    engine: str = field("native", help="what decodes: native (the project's batched sampler) or vllm (vLLM's "
                                        "async engine; needs the raygpt[vllm] extra)")
    vllm: VLLMServeConfig = field(VLLMServeConfig(), help="vLLM engine settings (engine: vllm)")

    def validate(self) -> None:
        b, s, lim = self.batching, self.scaling, self.limits
        checks = [
            ("engine", self.engine in ENGINES, f"must be one of {', '.join(ENGINES)}, got {self.engine!r}"),
            ("vllm.kv_cache_gib", self.vllm.kv_cache_gib > 0, "must be > 0"),
            ("vllm.max_num_seqs", self.vllm.max_num_seqs >= 1, "must be >= 1"),
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
            ("limits.max_prompt_tokens", lim.max_prompt_tokens >= 0, "must be >= 0 (0 = no limit)"),
            ("limits.max_request_tokens", lim.max_request_tokens >= 0, "must be >= 0 (0 = no limit)"),
            ("limits.max_streams_per_key", lim.max_streams_per_key >= 0, "must be >= 0 (0 = no limit)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why}")



def model_specs(items: list[str]) -> dict[str, Path]:
    """`PATH` or `NAME=PATH` → {name: absolute checkpoint dir}; ConfigError naming the bad item."""

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
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s}}
    else:
        scaling = {"num_replicas": s.max_replicas}
    ongoing = s.max_ongoing_requests or 2 * cfg.batching.max_batch_size
    threads = s.torch_threads or max(1, int(s.num_cpus))
    actor = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if cfg.engine == "vllm":
        from actors.engines.vllm import check_vllm_model  # the extra's absence → ConfigError with the install line

        for name, path in specs.items():  # refuse what vLLM cannot run before anything is deployed
            try:
                check_vllm_model(path)
            except CheckpointError as e:
                raise ConfigError(f"models: {name}: {e}") from None
        handles = {name: VLLMModelServer.options(name=f"model-{name}", max_ongoing_requests=ongoing,
                                                 ray_actor_options=actor, **scaling)
                   .bind(name, str(path), dataclasses.asdict(cfg.vllm)) for name, path in specs.items()}
    else:
        handles = {name: ModelServer.options(name=f"model-{name}", max_ongoing_requests=ongoing,
                                             ray_actor_options=actor, **scaling)
                   .bind(name, str(path), dataclasses.asdict(cfg.batching), threads) for name, path in specs.items()}
    return Ingress.options(
        num_replicas=cfg.http.ingress_replicas, max_ongoing_requests=cfg.http.ingress_max_ongoing_requests,
    ).bind(handles, dataclasses.asdict(cfg.limits), api_key_sha256(cfg), cfg.default_model)



def app(args: dict[str, str]) -> Any:
    """Application builder for `serve run jobs.serving.app:app models=a,b [config=serve.yaml] [scaling.max_replicas=2]`.
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
    decode = (f"vLLM, KV cache {cfg.vllm.kv_cache_gib:g} GiB, ≤ {cfg.vllm.max_num_seqs} choices" if cfg.engine == "vllm"
              else f"batch ≤ {b.max_batch_size} rows / {b.batch_wait_timeout_s:g} s")
    lines += [f"  model-{n}: {p}  replicas {reps}, {s.num_cpus:g} CPU each, {decode}" for n, p in specs.items()]
    return "\n".join(lines)
