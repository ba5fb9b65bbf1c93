"""Request limits and the OpenAPI description of the serving API, without Ray (docs/SERVING.md, "Limits").

- The OpenAPI description (jobs/serving/openapi.py) is a valid OpenAPI 3.1 document that schemathesis loads,
  and a property-based fuzz from it (valid bodies and schema-violating ones, hypothesis via schemathesis) shows
  the strict parser answers every body with a parsed request or a 4xx ApiError — never another exception.
- limits.max_prompt_tokens: the model replica's tokenizer check, code prompt_too_large (→ 413 at the ingress).
- limits.max_request_tokens: prompts × n × max_tokens, checked by the ingress (`IngressServer._job`, a plain
  class) before anything reaches a model → 413; limits.max_streams_per_key → 429 (open/close bookkeeping).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from jobs.config import ConfigError, from_dict
from jobs.serving.api import TOO_LARGE, ApiError, ChatRequest, CompletionRequest, Job, RequestError, parse
from jobs.serving.batcher import Batcher
from jobs.serving.openapi import openapi_spec
from models.config import GPTConfig
from models.gpt import GPT
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine() -> Batcher:
    from pydoc_data.topics import topics

    tok = Tokenizer.train(list(topics.values())[:200], vocab_size=300)
    torch.manual_seed(0)
    return Batcher(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)), tok, "nano", max_rows=4)


def test_prompt_token_limit_counts_every_prompt_of_the_request(engine: Batcher) -> None:
    assert len(engine.tokenize(Job([[1] * 5, [2] * 5], max_tokens=1, max_prompt_tokens=10))) == 2
    with pytest.raises(RequestError) as e:
        engine.tokenize(Job([[1] * 5, [2] * 6], max_tokens=1, max_prompt_tokens=10))
    assert e.value.code == "prompt_too_large" and e.value.code in TOO_LARGE and e.value.param == "prompt"
    assert "11 prompt tokens" in e.value.message
    assert len(engine.tokenize(Job([[1] * 30], max_tokens=1))) == 1  # 0 = no request-wide limit


def _ingress(**limits: int):
    from jobs.serving.deployments import IngressServer, LimitsConfig

    lim = {**vars(LimitsConfig()), **limits}
    return IngressServer({"m": None}, lim, None, None)


def test_completion_token_budget_is_a_413_before_any_model_sees_the_request() -> None:
    ingress = _ingress(max_tokens=64, max_choices=8, max_request_tokens=100)
    name, job = ingress._job(parse(CompletionRequest, {"prompt": ["a", "b"], "n": 2, "max_tokens": 25}))
    assert (name, job.max_tokens, job.n) == ("m", 25, 2)  # 2 × 2 × 25 = 100: at the limit, accepted
    with pytest.raises(ApiError) as e:
        ingress._job(parse(CompletionRequest, {"prompt": ["a", "b"], "n": 2, "max_tokens": 26}))
    assert (e.value.status, e.value.code, e.value.param) == (413, "request_too_large", "max_tokens")
    assert "104 completion tokens" in e.value.message
    # the default (0) leaves only max_choices × max_tokens
    _ingress(max_tokens=64, max_choices=8)._job(parse(CompletionRequest, {"prompt": "a", "n": 8, "max_tokens": 64}))


def test_streams_per_key_are_counted_and_released() -> None:
    class Req:  # the one attribute _open_stream reads of a starlette Request
        def __init__(self, key: str) -> None:
            self.headers = {"authorization": f"Bearer {key}"}

    ingress = _ingress(max_streams_per_key=2)
    ingress.key = b"x" * 32  # auth on: streams are counted per key
    a1, a2 = ingress._open_stream(Req("a")), ingress._open_stream(Req("a"))
    b1 = ingress._open_stream(Req("b"))  # another key has its own allowance
    with pytest.raises(ApiError) as e:
        ingress._open_stream(Req("a"))
    assert (e.value.status, e.value.code) == (429, "too_many_streams")
    ingress._close_stream(a1)
    ingress._close_stream(ingress._open_stream(Req("a")))  # a slot came free
    for who in (a2, b1):
        ingress._close_stream(who)
    assert ingress.streams == {}  # nothing leaks


def test_limits_must_not_be_negative() -> None:
    from jobs.serving.app import ServeConfig

    for name in ("max_prompt_tokens", "max_request_tokens", "max_streams_per_key"):
        with pytest.raises(ConfigError, match=f"^limits.{name}"):
            from_dict(ServeConfig, {"limits": {name: -1}})


# --- the OpenAPI description and a fuzz of the strict parser from it ----------------------------------------------
def test_openapi_description_is_valid_and_covers_the_public_endpoints() -> None:
    import schemathesis

    spec = openapi_spec()
    schema = schemathesis.openapi.from_dict(spec)
    ops = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert ops == {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                   ("GET", "/v1/models/{name}"), ("GET", "/healthz")}
    body = spec["components"]["schemas"]["CompletionRequest"]
    assert body["additionalProperties"] is False and "prompt" in body["required"]
    assert set(body["properties"]) == set(CompletionRequest.model_fields)


def _strategy(path: str, negative: bool):
    import schemathesis
    from schemathesis import GenerationMode

    op = schemathesis.openapi.from_dict(openapi_spec())[path]["POST"]
    return op.as_strategy(generation_mode=GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE)


@pytest.mark.parametrize("negative", [False, True], ids=["schema-valid", "schema-violating"])
@pytest.mark.parametrize("path,model", [("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatRequest)])
def test_fuzzed_bodies_parse_or_are_a_4xx(path: str, model: type, negative: bool) -> None:
    seen = {"ok": 0, "error": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=_strategy(path, negative))
    def check(case) -> None:  # noqa: ANN001
        body = case.body
        if not isinstance(body, dict):
            return  # non-object bodies are decode_json's (400 "must be a JSON object"), covered in test_serve.py
        try:
            req = parse(model, body)
            if isinstance(req, ChatRequest):
                req.to_completion()  # what the ingress does next: it must not fail on a parsed chat request
            seen["ok"] += 1
        except ApiError as e:
            assert 400 <= e.status < 500, (body, e.status)
            seen["error"] += 1

    check()
    if negative:
        assert seen["error"] > 0  # schema-violating bodies were generated and refused
    else:
        assert seen["ok"] > 0  # the description admits bodies the parser accepts
