"""jobs/serve.py on a real Ray Serve deployment (embedded 127.0.0.1 cluster), driven over HTTP by the official
`openai` client and by raw bytes. One module-scoped application serves two random `nano` checkpoints
("policy", "sft"), two replicas each, an API key, small limits; every test reuses it.

Independent reference: `models.generation.generate` on the same checkpoint, one prompt at a time (batch of 1),
with the seed the server gives that choice (derive_seed(request seed, choice index)).
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import re
import socket
import threading
import time
from functools import cache
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint, tokenizer_path
from models.config import GPTConfig
from models.generation import SamplingParams, generate
from models.gpt import GPT
from models.seeding import derive_seed
from models.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

KEY = "test-key-" + "x" * 24
N_CTX = 64  # the nano preset's context
MAX_TOKENS_CAP = 40


def make_checkpoint(path: Path, seed: int) -> Path:
    """A random `nano` GPT + a byte-level BPE trained on the stdlib's pydoc topics (no pretraining needed)."""
    from pydoc_data.topics import topics

    tok = Tokenizer.train(list(topics.values()), vocab_size=512)
    torch.manual_seed(seed)
    return save_checkpoint(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)), path, tokenizer=tok)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"policy": make_checkpoint(root / "policy", 0), "sft": make_checkpoint(root / "sft", 1)}


@pytest.fixture(scope="module")
def server(ckpts: dict[str, Path]):
    from ray import serve

    from cluster.runtime import init_ray, shutdown_ray
    from jobs.config import from_dict
    from jobs.serving.app import ServeConfig, build_app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = from_dict(ServeConfig, {
        "models": [f"{n}={p}" for n, p in ckpts.items()],
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
        "scaling": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5, "torch_threads": 1},
        "limits": {"max_tokens": MAX_TOKENS_CAP, "max_choices": 8, "max_body_bytes": 64 * 1024,
                   "request_timeout_s": 60.0},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYGPT_API_KEY", KEY)  # read (and hashed) by build_app only
        application = build_app(cfg)
    init_ray(num_cpus=4, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application, name="raygpt-test", route_prefix="/", blocking=False)
        yield {"port": port, "base": f"http://127.0.0.1:{port}/v1", "ckpts": ckpts}
    finally:
        serve.shutdown()
        shutdown_ray()


def client(server: dict, key: str = KEY) -> openai.OpenAI:
    # max_retries=0: a server error must show up as an error here, not be retried away by the client.
    return openai.OpenAI(base_url=server["base"], api_key=key, max_retries=0, timeout=60)


def raw(server: dict, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
        headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError:
        parsed = {"_text": data.decode(errors="replace")}
    return resp.status, parsed, dict(resp.getheaders())


@cache
def _loaded(path: Path) -> tuple[GPT, Tokenizer]:
    return load_checkpoint(path).eval(), Tokenizer.from_file(tokenizer_path(path))


def reference(path: Path, prompt: str, seed: int, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
              stop: tuple[str, ...] = (), index: int = 0) -> tuple[str, list[float]]:
    """What the server must answer for choice `index` of a request with `seed`: unbatched generate() with the
    choice's seed derive_seed(seed, index), cut at EOS and at the first stop."""
    model, tok = _loaded(path)
    g = generate(model, [tok.encode(prompt)], SamplingParams(
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p), eos_id=tok.eos_id,
        seeds=[derive_seed(seed, index)])
    ids = g.response_ids[0][g.response_mask[0].bool()].tolist()
    lps = g.logprobs[0][: len(ids)].tolist()
    if ids and ids[-1] == tok.eos_id:
        ids, lps = ids[:-1], lps[:-1]
    text = tok.decode(ids)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)] if cuts else text), lps


# --- the official client -----------------------------------------------------------------------------------------
def test_openai_client_completion_stream_and_models(server: dict) -> None:
    c = client(server)
    assert sorted(m.id for m in c.models.list()) == ["policy", "sft"]
    prompt, ref = "The meaning of", reference(server["ckpts"]["policy"], "The meaning of", 7, 24)[0]

    r = c.completions.create(model="policy", prompt=prompt, max_tokens=24, seed=7, temperature=1.0)
    assert r.object == "text_completion" and r.model == "policy"
    assert r.choices[0].text == ref
    n_prompt = len(_loaded(server["ckpts"]["policy"])[1].encode(prompt))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(c.completions.create(model="policy", prompt=prompt, max_tokens=24, seed=7, stream=True,
                                       stream_options={"include_usage": True}))
    assert len([ch for ch in chunks if ch.choices]) > 1, "streamed in one piece"
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(server: dict) -> None:
    body = json.dumps({"model": "sft", "prompt": "Hello", "max_tokens": 5, "seed": 1, "stream": True}).encode()
    status, parsed, headers = raw(server, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"^data: (.*)$", parsed["_text"], re.M)
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_model_field_routes_to_that_checkpoint(server: dict) -> None:
    c = client(server)
    texts = {}
    for name in ("policy", "sft"):
        texts[name] = c.completions.create(model=name, prompt="Once upon", max_tokens=20, temperature=0).choices[0].text
        assert texts[name] == reference(server["ckpts"][name], "Once upon", 0, 20, temperature=0)[0]
    assert texts["policy"] != texts["sft"]


def test_n_stop_and_logprobs_match_reference(server: dict) -> None:
    path, prompt = server["ckpts"]["policy"], "In the beginning"
    r = client(server).completions.create(model="policy", prompt=prompt, max_tokens=30, seed=100, n=3,
                                          stop=["e", "\n"], logprobs=3, temperature=0.8, top_p=0.9)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for ch in r.choices:
        text, lps = reference(path, prompt, 100, 30, 0.8, 0.9, stop=("e", "\n"), index=ch.index)
        assert ch.text == text
        assert ch.finish_reason == ("stop" if len(ch.logprobs.tokens) < 30 else "length")
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) == len(ch.logprobs.top_logprobs)
        got = torch.tensor(ch.logprobs.token_logprobs)
        torch.testing.assert_close(got, torch.tensor(lps[: len(got)]), atol=1e-4, rtol=1e-4)
        for chosen, top in zip(ch.logprobs.token_logprobs, ch.logprobs.top_logprobs):
            assert len(top) <= 3 and max(top.values()) >= chosen - 1e-4  # the best alternative is at least as likely


def test_chat_completions_render_the_documented_template(server: dict) -> None:
    c, path = client(server), server["ckpts"]["sft"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a king."}]
    prompt = "System: Be brief.\nUser: Name a king.\nAssistant:"
    ref = reference(path, prompt, 3, 16, stop=("\nUser:", "\nSystem:"))[0]
    r = c.chat.completions.create(model="sft", messages=messages, max_tokens=16, seed=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref
    chunks = list(c.chat.completions.create(model="sft", messages=messages, max_tokens=16, seed=3, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref


def test_wrong_or_missing_api_key_is_401(server: dict) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").completions.create(model="policy", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/metrics", "GET")):
        assert raw(server, method, path, b'{"prompt": "hi"}', key=None)[0] == 401
    assert raw(server, "GET", "/healthz", key=None)[0] == 200  # for load balancers


# --- batching ----------------------------------------------------------------------------------------------------
def _batch_rows_over_one(server: dict) -> float:
    """Requests so far (on the ingress' Prometheus /metrics) that were decoded in a batch of more than 1 row."""
    text = raw(server, "GET", "/metrics")[1]["_text"]
    count = re.search(r'raygpt_batch_rows_count\{model="policy"\} (\S+)', text)
    le1 = re.search(r'raygpt_batch_rows_bucket\{le="1.0",model="policy"\} (\S+)', text)
    return float(count.group(1)) - float(le1.group(1)) if count and le1 else 0.0


def test_concurrent_requests_are_batched_and_equal_unbatched(server: dict) -> None:
    c, path = client(server), server["ckpts"]["policy"]
    reqs = [dict(prompt=f"Line {i}: the quick brown fox", seed=1000 + i, max_tokens=12 + i % 5,
                 temperature=0.0 if i % 4 == 0 else 1.0) for i in range(16)]
    before = _batch_rows_over_one(server)
    start = threading.Barrier(len(reqs))

    def one(r: dict) -> tuple[int, str]:
        start.wait()
        resp = c.completions.with_raw_response.create(model="policy", **r)
        return int(resp.headers["x-raygpt-batch-rows"]), resp.parse().choices[0].text

    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        results = list(pool.map(one, reqs))
    assert max(rows for rows, _ in results) > 1, f"no request was batched: {[rows for rows, _ in results]}"
    assert _batch_rows_over_one(server) > before
    for r, (_, text) in zip(reqs, results):
        assert text == reference(path, r["prompt"], r["seed"], r["max_tokens"], r["temperature"])[0], r


# --- bad input ---------------------------------------------------------------------------------------------------
def _j(**kw) -> bytes:
    return json.dumps({"model": "policy", **kw}).encode()


BAD = [  # (id, method, path, body, expected status, expected param)
    ("malformed-json", "POST", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("not-an-object", "POST", "/v1/completions", b"[1, 2]", 400, None),
    ("invalid-utf8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe abc"}', 400, None),
    ("lone-surrogate", "POST", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("nan", "POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("prompt-int", "POST", "/v1/completions", _j(prompt=5), 400, "prompt"),
    ("prompt-mixed", "POST", "/v1/completions", _j(prompt=["a", 3]), 400, "prompt"),
    ("max-tokens-str", "POST", "/v1/completions", _j(prompt="x", max_tokens="16"), 400, "max_tokens"),
    ("max-tokens-neg", "POST", "/v1/completions", _j(prompt="x", max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-zero", "POST", "/v1/completions", _j(prompt="x", max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", "POST", "/v1/completions", _j(prompt="x", max_tokens=10**12), 400, "max_tokens"),
    ("max-tokens-cap", "POST", "/v1/completions", _j(prompt="x", max_tokens=MAX_TOKENS_CAP + 1), 400, "max_tokens"),
    ("temperature-neg", "POST", "/v1/completions", _j(prompt="x", temperature=-0.1), 400, "temperature"),
    ("temperature-str", "POST", "/v1/completions", _j(prompt="x", temperature="hot"), 400, "temperature"),
    ("top-p-zero", "POST", "/v1/completions", _j(prompt="x", top_p=0), 400, "top_p"),
    ("n-float", "POST", "/v1/completions", _j(prompt="x", n=1.5), 400, "n"),
    ("n-too-many", "POST", "/v1/completions", _j(prompt="x", n=9), 400, "n"),
    ("stream-str", "POST", "/v1/completions", _j(prompt="x", stream="yes"), 400, "stream"),
    ("stop-int", "POST", "/v1/completions", _j(prompt="x", stop=3), 400, "stop"),
    ("logprobs-6", "POST", "/v1/completions", _j(prompt="x", logprobs=6), 400, "logprobs"),
    ("seed-neg", "POST", "/v1/completions", _j(prompt="x", seed=-1), 400, "seed"),
    ("unknown-field", "POST", "/v1/completions", _j(prompt="x", max_token=3), 400, "max_token"),
    ("missing-prompt", "POST", "/v1/completions", _j(), 400, "prompt"),
    ("empty-prompt", "POST", "/v1/completions", _j(prompt=""), 400, "prompt"),
    ("empty-list", "POST", "/v1/completions", _j(prompt=[]), 400, "prompt"),
    ("empty-item", "POST", "/v1/completions", _j(prompt=["a", ""]), 400, "prompt"),
    ("over-n-ctx", "POST", "/v1/completions", _j(prompt="word " * 200, max_tokens=1), 400, "prompt"),
    ("prompt+max-over-n-ctx", "POST", "/v1/completions", _j(prompt=[1] * 30, max_tokens=MAX_TOKENS_CAP), 400,
     "max_tokens"),
    ("token-out-of-vocab", "POST", "/v1/completions", _j(prompt=[1, 99999]), 400, "prompt"),
    ("stream-over-n-ctx", "POST", "/v1/completions", _j(prompt="word " * 200, stream=True), 400, "prompt"),
    ("unknown-model", "POST", "/v1/completions", _j(prompt="x").replace(b"policy", b"gpt-9"), 404, "model"),
    ("unsupported-echo", "POST", "/v1/completions", _j(prompt="x", echo=True), 400, "echo"),
    ("body-too-large", "POST", "/v1/completions", _j(prompt="x" * 70_000), 413, None),
    ("chat-bad-role", "POST", "/v1/chat/completions", _j(messages=[{"role": "bot", "content": "x"}]), 400,
     "messages[0].role"),
    ("wrong-method", "GET", "/v1/completions", None, 405, None),
    ("unknown-path", "POST", "/v1/nothing", b"{}", 404, None),
]


def test_bad_input_gets_4xx_naming_the_field_and_server_keeps_serving(server: dict) -> None:
    failures = []
    for case, method, path, body, status, param in BAD:
        got, parsed, _ = raw(server, method, path, body)
        err = parsed.get("error", {})
        if got != status or set(err) != {"message", "type", "param", "code"} or (param and err["param"] != param):
            failures.append((case, got, parsed))
        elif param:
            assert param in err["message"], (case, err)
    assert not failures, failures
    # still serving, both models, both modes
    c = client(server)
    for name in ("policy", "sft"):
        assert c.completions.create(model=name, prompt="still", max_tokens=4).choices[0].text is not None
    assert raw(server, "GET", "/healthz")[0] == 200


# --- security ----------------------------------------------------------------------------------------------------
def test_every_listening_socket_is_loopback(server: dict) -> None:
    import psutil  # pinned in constraints.txt: this test must never skip
    me = psutil.Process()
    listening = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert any(port == server["port"] for _, _, port in listening), "the HTTP proxy was not found"
    exposed = [x for x in listening if x[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, exposed


# --- fault tolerance (last: it disturbs the deployment) ----------------------------------------------------------
def test_requests_keep_succeeding_when_a_replica_is_killed(server: dict) -> None:
    import ray

    c, path = client(server), server["ckpts"]["policy"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "model-policy" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(replicas) == 2, replicas
    reqs = [dict(prompt=f"Request {i} says", seed=5000 + i, max_tokens=32) for i in range(24)]
    done = threading.Semaphore(0)

    def one(r: dict) -> str:
        try:
            return c.completions.create(model="policy", **r).choices[0].text
        finally:
            done.release()

    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, r) for r in reqs]
        for _ in range(4):
            done.acquire(timeout=60)
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        texts = [f.result() for f in futures]  # raises if any request failed
    assert time.monotonic() - killed_at < 120
    for r, text in zip(reqs, texts):
        assert text == reference(path, r["prompt"], r["seed"], r["max_tokens"])[0]
    assert c.completions.create(model="policy", prompt="after", max_tokens=4).choices[0].text is not None
