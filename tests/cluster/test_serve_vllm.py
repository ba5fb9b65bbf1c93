"""`raygpt serve` with `engine: vllm` (jobs/serving/vllm_server.py) on a real Ray Serve deployment (embedded
127.0.0.1 cluster), driven by the official `openai` client and raw HTTP. One module-scoped application, one model,
one replica (vLLM start ~5–25 s).

Independent references: our GPT run by PyTorch on the same checkpoint — greedy decoding through
`models.generation.generate` (vLLM's greedy tokens must be the same), and the full forward pass with
`tempered_logprobs` on the tokens vLLM sampled (its reported log-probs must agree). Sampled (T > 0) text cannot be
compared token for token with the native engine (other random numbers); it is checked for what the API promises:
a seed reproduces a choice, choice i of n is seeded derive_seed(seed, i) (choice 0 = the n=1 request's), streamed
text equals the whole reply.
"""

from __future__ import annotations

import json
import re
import socket
from functools import cache
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint, tokenizer_path
from models.config import GPTConfig
from models.generation import SamplingParams, generate, tempered_logprobs
from models.gpt import GPT
from models.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

KEY = "test-key-" + "v" * 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random `nano` GPT with one head (head size 32, which vLLM's CPU attention supports) + a byte-level BPE."""
    from pydoc_data.topics import topics

    tok = Tokenizer.train(list(topics.values()), vocab_size=512)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("nano", n_head=1, vocab_size=tok.vocab_size))
    return save_checkpoint(model, tmp_path_factory.mktemp("serve-vllm") / "policy", tokenizer=tok)


@pytest.fixture(scope="module")
def server(ckpt: Path):
    from ray import serve

    from cluster.runtime import init_ray, shutdown_ray
    from jobs.config import from_dict
    from jobs.serving.app import ServeConfig, build_app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = from_dict(ServeConfig, {
        "models": [f"policy={ckpt}"], "engine": "vllm", "vllm": {"kv_cache_gib": 0.25},
        "scaling": {"num_cpus": 1},
        "limits": {"max_tokens": 40, "max_choices": 8, "request_timeout_s": 120.0},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYGPT_API_KEY", KEY)
        application = build_app(cfg)
    init_ray(num_cpus=3, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application, name="raygpt-vllm-test", route_prefix="/", blocking=False)
        yield {"port": port, "base": f"http://127.0.0.1:{port}/v1", "ckpt": ckpt}
    finally:
        serve.shutdown()
        shutdown_ray()


def client(server: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"], api_key=KEY, max_retries=0, timeout=120)


@cache
def _loaded(path: Path) -> tuple[GPT, Tokenizer]:
    return load_checkpoint(path).eval(), Tokenizer.from_file(tokenizer_path(path))


def greedy_reference(path: Path, prompt: str, max_tokens: int) -> str:
    model, tok = _loaded(path)
    g = generate(model, [tok.encode(prompt)], SamplingParams(max_new_tokens=max_tokens, temperature=0),
                 eos_id=tok.eos_id, seeds=[0])
    ids = g.response_ids[0][g.response_mask[0].bool()].tolist()
    return tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids)


def recomputed_logprobs(path: Path, prompt: str, tokens: list[str], temperature: float) -> torch.Tensor:
    """Our model's tempered log-probs of the completion tokens the server returned (decoded one by one)."""
    model, tok = _loaded(path)
    ids = tok.encode(prompt)
    resp = []
    for t in tokens:
        raw = bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", t)) if t.startswith("bytes:") else t.encode()
        resp.append(next(i for i in range(tok.vocab_size) if tok.decode_bytes(i) == raw))
    with torch.no_grad():
        logits = model(torch.tensor([ids + resp]))[0, len(ids) - 1: -1]
    return tempered_logprobs(logits, torch.tensor(resp), temperature)


def test_completions_stream_and_chat_through_vllm(server: dict) -> None:
    c, path = client(server), server["ckpt"]
    assert [m.id for m in c.models.list()] == ["policy"]

    greedy = c.completions.create(model="policy", prompt="Once upon", max_tokens=20, temperature=0)
    assert greedy.choices[0].text == greedy_reference(path, "Once upon", 20)

    r = c.completions.create(model="policy", prompt="The meaning of", max_tokens=24, seed=7)
    again = c.completions.create(model="policy", prompt="The meaning of", max_tokens=24, seed=7)
    assert r.choices[0].text == again.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(_loaded(path)[1].encode("The meaning of"))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(c.completions.create(model="policy", prompt="The meaning of", max_tokens=24, seed=7, stream=True,
                                       stream_options={"include_usage": True}))
    assert len([ch for ch in chunks if ch.choices]) > 1, "streamed in one piece"
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    messages = [{"role": "user", "content": "Name a king."}]
    chat = c.chat.completions.create(model="policy", messages=messages, max_tokens=16, seed=3)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = list(c.chat.completions.create(model="policy", messages=messages, max_tokens=16, seed=3, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content


def test_n_choices_seeds_stops_and_logprobs(server: dict) -> None:
    c, path, prompt = client(server), server["ckpt"], "In the beginning"
    r = c.completions.create(model="policy", prompt=prompt, max_tokens=30, seed=100, n=3, stop=["e", "\n"],
                             logprobs=3, temperature=0.8)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    # choice i samples with derive_seed(seed, i), as on the native engine: choice 0 is the n=1 request's choice
    one = c.completions.create(model="policy", prompt=prompt, max_tokens=30, seed=100, stop=["e", "\n"],
                               logprobs=3, temperature=0.8).choices[0]
    assert one.text == r.choices[0].text
    for ch in r.choices:
        assert "e" not in ch.text and "\n" not in ch.text
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        if lp.tokens:
            got = torch.tensor(lp.token_logprobs)
            want = recomputed_logprobs(path, prompt, lp.tokens, 0.8)
            assert (got - want).abs().max() < 1e-4, (got, want)  # vLLM's kernels vs PyTorch's, fp32
        for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
            assert 1 <= len(top) <= 3 and max(top.values()) >= chosen - 1e-5


def test_bad_requests_are_refused_before_vllm(server: dict) -> None:
    import http.client

    for body, param in ((b'{"model": "policy", "prompt": [1, 99999]}', "prompt"),
                        (json.dumps({"model": "policy", "prompt": "word " * 200}).encode(), "prompt"),
                        (b'{"model": "policy", "prompt": "x", "max_tokens": 41}', "max_tokens")):
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        conn.close()
        assert resp.status == 400 and err["param"] == param, err
    assert client(server).completions.create(model="policy", prompt="still", max_tokens=4).choices[0].text is not None
