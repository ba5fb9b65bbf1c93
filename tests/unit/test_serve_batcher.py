"""The serving engine and HTTP schema without Ray (jobs/serving/batcher.py, jobs/serving/api.py, jobs/serve.py config).

Reference for every completion: `models.generation.generate` on one prompt alone (batch of 1) with the choice's
seed, cut at EOS and at the first stop sequence — written here naively, independent of the engine's incremental
decoding, grouping and packing.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import pytest
import torch

from jobs.config import ConfigError, from_dict
from jobs.serving.api import ApiError, ChatRequest, CompletionRequest, Job, RequestError, chat_prompt, parse
from jobs.serving.batcher import Batcher, _Row, pack_rows
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.generation import SamplingParams, generate
from models.gpt import GPT
from models.seeding import derive_seed
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from pydoc_data.topics import topics

    return Tokenizer.train(list(topics.values()), vocab_size=512)


@pytest.fixture(scope="module")
def engine(tok: Tokenizer) -> Batcher:
    torch.manual_seed(0)
    return Batcher(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)), tok, "nano", max_rows=4)


def reference(engine: Batcher, prompt: str | list[int], seed: int, job: Job
              ) -> tuple[str, list[int], list[float], str]:
    ids = engine.tok.encode(prompt) if isinstance(prompt, str) else prompt
    g = generate(engine.model, [ids], SamplingParams(max_new_tokens=job.max_tokens, temperature=job.temperature,
                                                     top_p=job.top_p), eos_id=engine.eos, seeds=[seed])
    out = g.response_ids[0][g.response_mask[0].bool()].tolist()
    lps = g.logprobs[0][: len(out)].tolist()
    eos = bool(out) and out[-1] == engine.eos
    if eos:
        out, lps = out[:-1], lps[:-1]
    text = engine.tok.decode(out)
    cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
    return (text[: min(cuts)] if cuts else text), out, lps, "stop" if eos or cuts else "length"


JOBS = [
    Job(["Hello world", "The"], n=2, max_tokens=12, temperature=0.8, top_p=0.9, seed=5, stop=("e", "\n"), logprobs=0),
    Job(["The quick brown fox"], max_tokens=20, temperature=0.0),
    Job([[1, 2, 3]], n=3, max_tokens=7, temperature=1.0, seed=3),
    Job(["x" * 40], max_tokens=20, temperature=1.0, seed=11, stop=("the",)),  # long prompt: its own sub-batch
    Job(["Hello world"], max_tokens=16, temperature=0.8, top_p=0.9, seed=6, logprobs=2),  # shares job 0's group
]


@pytest.fixture(scope="module")
def together(engine: Batcher) -> list:
    return engine.run(JOBS)


def test_batched_jobs_equal_each_job_alone_and_the_reference(engine: Batcher, together: list) -> None:
    for job, choices in zip(JOBS, together):
        assert [c.index for c in choices] == list(range(len(job.prompts) * job.n))
        alone = engine.run([job])[0]
        for c, a in zip(choices, alone):
            assert (c.text, c.token_ids, c.finish_reason) == (a.text, a.token_ids, a.finish_reason)
            prompt = job.prompts[c.index // job.n]
            text, ids, lps, finish = reference(engine, prompt, derive_seed(job.seed, c.index), job)
            assert (c.text, c.finish_reason) == (text, finish)
            if c.finish_reason == "length" or not job.stop:
                assert c.token_ids == ids
            if job.logprobs is not None:
                torch.testing.assert_close(torch.tensor(c.token_logprobs), torch.tensor(lps[: len(c.token_ids)]),
                                           atol=1e-5, rtol=1e-5)
    assert max(c.batch_rows for cs in together for c in cs) == sum(len(j.prompts) * j.n for j in JOBS)


def test_stream_deltas_concatenate_to_the_full_completion(engine: Batcher, together: list) -> None:
    acc: list[dict[int, list]] = [{} for _ in JOBS]
    ended = [False] * len(JOBS)
    for out in engine.steps(JOBS):
        for j, deltas in enumerate(out):
            if deltas is None:
                ended[j] = True
                continue
            assert not ended[j], "a job produced output after it ended"
            for d in deltas:
                text, ids, finish = acc[j].setdefault(d.index, ["", [], []])
                assert not finish, "output after finish_reason"
                finish = finish + [d.finish_reason] * bool(d.finish_reason)
                acc[j][d.index] = [text + d.text, ids + d.token_ids, finish]
    for j, choices in enumerate(together):
        for c in choices:
            text, ids, finish = acc[j][c.index]
            assert (text, ids, finish) == (c.text, c.token_ids, [c.finish_reason])


def test_top_logprobs_agree_with_the_sampler(engine: Batcher) -> None:
    job = Job(["Once"], max_tokens=10, temperature=0.0, logprobs=3)
    c = engine.run([job])[0][0]
    top = engine.top_logprobs(engine.tok.encode("Once"), c.token_ids, 3, 0.0)
    for tid, lp, alternatives in zip(c.token_ids, c.token_logprobs, top):
        best = max(alternatives, key=alternatives.get)  # greedy: the chosen token is the most likely one
        assert best == engine.token_str(tid) and abs(alternatives[best] - lp) < 1e-4
        assert list(alternatives.values()) == sorted(alternatives.values(), reverse=True)


def test_pack_rows_fits_every_sub_batch_in_the_context() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n_ctx = rng.randint(8, 64)
        rows = []
        for i in range(rng.randint(1, 12)):
            p = rng.randint(1, n_ctx - 1)
            rows.append(_Row(0, i, [1] * p, Job(["x"], max_tokens=rng.randint(1, n_ctx - p))))
        bins = pack_rows(rows, n_ctx)
        assert sorted(r.index for b in bins for r in b) == list(range(len(rows)))
        for b in bins:
            assert max(len(r.prompt) for r in b) + max(r.spec.max_tokens for r in b) <= n_ctx


@pytest.mark.parametrize("prompt, max_tokens, param", [
    ([[]], 4, "prompt"), ([[5, 600]], 4, "prompt"), ([[-1]], 4, "prompt"), ([[1] * 64], 1, "prompt"),
    ([[1] * 40], 30, "max_tokens"), (["ok", [1] * 70], 1, "prompt[1]"),
])
def test_prompts_the_model_cannot_serve_name_the_field(engine: Batcher, prompt: list, max_tokens: int,
                                                        param: str) -> None:
    with pytest.raises(RequestError) as e:
        engine.tokenize(Job(prompt, max_tokens=max_tokens))
    assert e.value.param == param and e.value.message.startswith(param)


# --- HTTP schema ---------------------------------------------------------------------------------------------
def test_request_parsing_accepts_the_openai_shapes() -> None:
    r = parse(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "stop": "\n", "temperature": 0, "n": 2,
                                  "presence_penalty": 0, "logit_bias": {}, "user": "u", "best_of": 2})
    assert r.prompts() == ["a", "b"] and r.stops() == ("\n",) and r.temperature == 0.0
    assert parse(CompletionRequest, {"prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse(CompletionRequest, {"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": True}, "max_tokens"), ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop"), ({"prompt": "x", "stop": list("abcde")}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"1": "a"}}, "logit_bias.1"), ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
])
def test_bad_fields_are_named(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, body)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_template_and_conversion() -> None:
    req = parse(ChatRequest, {"messages": [{"role": "system", "content": "Be kind."},
                                           {"role": "user", "content": "Hi"}], "max_tokens": 5, "stop": "!"})
    assert chat_prompt(req.messages) == "System: Be kind.\nUser: Hi\nAssistant:"
    c = req.to_completion()
    assert c.prompt == "System: Be kind.\nUser: Hi\nAssistant:" and c.max_tokens == 5
    assert c.stops() == ("!", "\nUser:", "\nSystem:")


# --- config ------------------------------------------------------------------------------------------------
def _ckpt(path: Path, tok: Tokenizer) -> Path:
    return save_checkpoint(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)), path, tokenizer=tok)


def test_model_names_and_bad_checkpoints(tmp_path: Path, tok: Tokenizer) -> None:
    from jobs.serving.app import model_specs

    a = _ckpt(tmp_path / "runs" / "sft" / "checkpoint", tok)
    b = _ckpt(tmp_path / "other", tok)
    assert model_specs([str(a), str(b)]) == {"sft": a.resolve(), "other": b.resolve()}
    assert list(model_specs([f"policy={a}"])) == ["policy"]
    for items, where in (([str(a), f"sft={b}"], "models[1]: duplicate"), ([str(tmp_path / "none")], "models[0]"),
                         ([f"a/b={a}"], "models[0]: invalid"), ([], "models:")):
        with pytest.raises(ConfigError, match="^" + re.escape(where)):
            model_specs(items)


def test_config_validation_and_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from jobs.serving.app import ServeConfig, api_key_sha256

    with pytest.raises(ConfigError, match="^limits.max_choices"):
        from_dict(ServeConfig, {"batching": {"max_batch_size": 4}, "limits": {"max_choices": 8}})
    with pytest.raises(ConfigError, match="^scaling.min_replicas"):
        from_dict(ServeConfig, {"scaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="^api_key: unknown field"):
        from_dict(ServeConfig, {"api_key": "secret"})  # keys never come from config values or the command line
    monkeypatch.delenv("RAYGPT_API_KEY", raising=False)
    assert api_key_sha256(ServeConfig()) is None
    monkeypatch.setenv("RAYGPT_API_KEY", "k1")
    assert api_key_sha256(ServeConfig()) == hashlib.sha256(b"k1").hexdigest()
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    assert api_key_sha256(from_dict(ServeConfig, {"http": {"api_key_file": str(key_file)}})) == \
        hashlib.sha256(b"k2").hexdigest()
    key_file.write_text("")
    with pytest.raises(ConfigError, match="^http.api_key_file"):
        api_key_sha256(from_dict(ServeConfig, {"http": {"api_key_file": str(key_file)}}))


def test_build_app_one_deployment_per_model_with_the_configured_scaling(tmp_path: Path, tok: Tokenizer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from jobs.serving.app import ServeConfig, build_app

    a, b = _ckpt(tmp_path / "a", tok), _ckpt(tmp_path / "b", tok)
    monkeypatch.setenv("RAYGPT_API_KEY", "k3")
    cfg = from_dict(ServeConfig, {"models": [f"ppo={a}", f"sft={b}"], "batching": {"max_batch_size": 8},
                                  "limits": {"max_choices": 8},
                                  "scaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 5,
                                              "num_cpus": 2, "torch_threads": 0}})
    ingress = build_app(cfg)._bound_deployment
    models, limits, key, default = ingress.init_args
    assert ingress.name == "ingress" and key == hashlib.sha256(b"k3").hexdigest() and default is None
    assert limits["max_choices"] == 8 and list(models) == ["ppo", "sft"]
    for name, path in (("ppo", a), ("sft", b)):
        d = models[name]._bound_deployment
        auto = d._deployment_config.autoscaling_config
        assert d.name == f"model-{name}" and d.init_args[:2] == (name, str(path.resolve()))
        assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 5.0)
        assert d.ray_actor_options["num_cpus"] == 2 and d.init_args[3] == 2  # torch threads follow num_cpus
        assert d.max_ongoing_requests == 16  # 2 × max_batch_size: one batch queues while one decodes
    fixed = build_app(from_dict(ServeConfig, {"models": [str(a)], "scaling": {"min_replicas": 2, "max_replicas": 2}}))
    d = next(iter(fixed._bound_deployment.init_args[0].values()))._bound_deployment
    assert d._deployment_config.autoscaling_config is None and d.num_replicas == 2


# --- ingress deadlines and retries (a stand-in for a model deployment's handle; the real one is exercised by
# tests/cluster/test_serve.py, including a killed replica) ----------------------------------------------------
class _Handle:
    """Quacks like `DeploymentHandle` for `.complete.remote(job)`: each call pops the next behaviour."""

    def __init__(self, *behaviours: object) -> None:
        self.behaviours, self.calls, self.cancelled = list(behaviours), 0, 0
        self.complete = self

    def remote(self, job: Job):  # noqa: ANN201
        self.calls += 1
        behaviour, handle = self.behaviours.pop(0), self

        class Response:
            def __await__(self):  # noqa: ANN204
                async def run():  # noqa: ANN202
                    if isinstance(behaviour, float):
                        await asyncio.sleep(behaviour)
                    if isinstance(behaviour, BaseException):
                        raise behaviour
                    return behaviour
                return run().__await__()

            def cancel(self) -> None:
                handle.cancelled += 1

        return Response()


def _ingress(handle: _Handle, **limits: object):  # noqa: ANN202
    import dataclasses

    from jobs.serving.deployments import IngressServer, LimitsConfig

    return IngressServer({"m": handle}, dataclasses.asdict(LimitsConfig(**limits)), None, None)


def test_ingress_answers_408_at_the_deadline_and_cancels_the_request() -> None:
    handle = _Handle(30.0)
    ingress = _ingress(handle, request_timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(ApiError) as e:
        asyncio.run(ingress._call("m", Job(["x"]), t0))
    assert e.value.status == 408 and e.value.code == "timeout" and handle.cancelled == 1
    assert time.perf_counter() - t0 < 5


def test_ingress_resends_when_the_replica_died_and_gives_up_after_the_retries() -> None:
    from ray.exceptions import ActorDiedError

    from jobs.serving.deployments import Reply

    ok = Reply(prompt_tokens=3)
    handle = _Handle(ActorDiedError(), ActorDiedError(), ok)
    assert asyncio.run(_ingress(handle, retries=2)._call("m", Job(["x"]), time.perf_counter())) is ok
    assert handle.calls == 3
    handle = _Handle(ActorDiedError(), ActorDiedError())
    with pytest.raises(ActorDiedError):
        asyncio.run(_ingress(handle, retries=1)._call("m", Job(["x"]), time.perf_counter()))
    assert handle.calls == 2
    handle = _Handle(ValueError("a bug"), ok)  # not a dead replica: never re-sent
    with pytest.raises(ValueError):
        asyncio.run(_ingress(handle, retries=2)._call("m", Job(["x"]), time.perf_counter()))
    assert handle.calls == 1
