"""The serving engine: what one model replica does with a batch of completion jobs. Plain Python, no Ray.

A *job* is one validated HTTP request (several prompts × `n` choices); each choice is a *row* of the batched
sampler (`models.generation.stream`). Rows that share (temperature, top_p) decode in one sampler batch; rows
with other sampling settings form another group, and the groups advance in lock-step, one token per step
each, so a streaming client never waits for a whole other group. Within a group, rows are packed first-fit
into sub-batches whose longest prompt + longest max_tokens fits n_ctx (the sampler left-pads to the longest
prompt and pre-allocates the cache for the longest response).

Each row has its own seed (request seed + choice index), so a row's sample does not depend on its batch-mates:
a request gives the same completion whether it was batched with 31 others or ran alone.

Text is decoded incrementally; a delta holds back (a) a trailing U+FFFD (the token ended inside a multi-byte
UTF-8 character) and (b) the last len(longest stop)-1 characters, which could still become a stop sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from jobs.serving.api import ChoiceDelta, Job, RequestError
from models.checkpoint import load_checkpoint, tokenizer_path
from models.generation import SamplingParams, left_pad, stream, tempered
from models.gpt import GPT
from models.seeding import derive_seed
from models.tokenizer import Tokenizer


class _Row:
    """Decoding state of one choice."""

    def __init__(self, job: int, index: int, prompt: list[int], spec: Job) -> None:
        self.job, self.index, self.prompt, self.spec = job, index, prompt, spec
        self.seed = derive_seed(spec.seed, index)
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.ends: list[int] = []  # ends[i] = len(decode(ids[:i+1])): where token i's text ends
        self.text = ""
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finish: str | None = None
        self.closed = False  # the delta carrying finish_reason has been handed out
        self.hold = max((len(s) for s in spec.stop), default=1) - 1

    def push(self, token: int, logprob: float, eos: int, tok: Tokenizer) -> None:
        if token == eos:
            self.finish = "stop"
            return
        self.ids.append(token)
        self.lps.append(logprob)
        self.text = tok.decode(self.ids)
        self.ends.append(len(self.text))
        cut = min((i for i in (self.text.find(s) for s in self.spec.stop) if i >= 0), default=-1)
        if cut >= 0:  # OpenAI: the stop sequence itself is not returned
            self.text = self.text[:cut]
            keep = sum(1 for i in range(len(self.ids)) if (self.ends[i - 1] if i else 0) < cut)
            del self.ids[keep:], self.lps[keep:], self.ends[keep:]
            self.finish = "stop"
        elif len(self.ids) >= self.spec.max_tokens:
            self.finish = "length"

    def delta(self, batch_rows: int) -> ChoiceDelta | None:
        if self.closed:
            return None
        end = len(self.text)
        if self.finish is None:
            end -= self.hold
            while end > self.sent_chars and self.text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, self.sent_chars)
        n_tok = len(self.ids) if self.finish else sum(1 for e in self.ends if e <= end)
        n_tok = max(n_tok, self.sent_tokens)
        if end == self.sent_chars and n_tok == self.sent_tokens and self.finish is None:
            return None
        d = ChoiceDelta(self.index, self.text[self.sent_chars:end], finish_reason=self.finish, batch_rows=batch_rows)
        new = range(self.sent_tokens, n_tok)
        d.token_ids = [self.ids[i] for i in new]
        if self.spec.logprobs is not None:
            d.token_logprobs = [self.lps[i] for i in new]
            d.text_offset = [min(self.ends[i - 1] if i else 0, len(self.text)) for i in new]
        self.sent_chars, self.sent_tokens = end, n_tok
        self.closed = self.finish is not None
        return d


def _group_key(spec: Job) -> tuple[float, float]:
    return (0.0, 1.0) if spec.temperature == 0 else (spec.temperature, spec.top_p)


def pack_rows(rows: Sequence[_Row], n_ctx: int) -> list[list[_Row]]:
    """First-fit packing: every sub-batch satisfies max prompt + max max_tokens ≤ n_ctx (each row alone does)."""
    bins: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: -len(r.prompt)):
        for b in bins:
            if len(b[0].prompt) + max(row.spec.max_tokens, *(r.spec.max_tokens for r in b)) <= n_ctx:
                b.append(row)
                break
        else:
            bins.append([row])
    return bins


class TextCodec:
    """A model's tokenizer and limits (context, vocabulary): what a request is checked and decoded against, with
    no weights. The native `Batcher` and the vLLM model server (jobs/serving/vllm_server.py) share it."""

    def __init__(self, tokenizer: Tokenizer, n_ctx: int, vocab: int, name: str = "model") -> None:
        self.tok = tokenizer
        self.name = name
        self.n_ctx = n_ctx
        self.vocab = vocab
        self.eos = tokenizer.eos_id

    def token_str(self, token_id: int) -> str:
        """A token as text, or OpenAI's `bytes:\\xNN…` form when it is not whole UTF-8 on its own (byte-level BPE
        splits multi-byte characters), so distinct tokens never collide as U+FFFD."""
        raw = self.tok.decode_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # --- validation (before a job joins a batch) ------------------------------------------------------------
    def tokenize(self, job: Job) -> list[list[int]]:
        """Token ids of every prompt; RequestError naming the field if a prompt cannot be served."""
        out: list[list[int]] = []
        for i, p in enumerate(job.prompts):
            where = "prompt" if len(job.prompts) == 1 else f"prompt[{i}]"
            ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise RequestError(where, "must not be empty")
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise RequestError(where, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
            if len(ids) + job.max_tokens > self.n_ctx:
                raise RequestError(
                    where if len(ids) >= self.n_ctx else "max_tokens",
                    f"this model's context is {self.n_ctx} tokens; the prompt has {len(ids)} and max_tokens asks "
                    f"for {job.max_tokens} more. Shorten the prompt or lower max_tokens.",
                    "context_length_exceeded",
                )
            out.append(ids)
        total = sum(len(ids) for ids in out)
        if job.max_prompt_tokens and total > job.max_prompt_tokens:
            raise RequestError("prompt", f"{total} prompt tokens in this request; this server accepts at most "
                               f"{job.max_prompt_tokens} (limits.max_prompt_tokens)", "prompt_too_large")
        return out


class Batcher(TextCodec):
    """A loaded checkpoint + tokenizer that turns batches of `Job`s into streams of `ChoiceDelta`s."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, name: str = "model", max_rows: int = 64) -> None:
        super().__init__(tokenizer, model.config.n_ctx, model.config.vocab_size, name)
        self.model = model.eval()
        self.max_rows = max_rows  # sampler rows per sub-batch (memory bound of the KV cache)

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str, max_rows: int = 64, device: str = "cpu") -> Batcher:
        model = load_checkpoint(path, kind="lm").to(device)
        return cls(model, Tokenizer.from_file(tokenizer_path(path)), name, max_rows)  # type: ignore[arg-type]

    # --- decoding ---------------------------------------------------------------------------------------------
    def steps(self, jobs: Sequence[Job], prompts: Sequence[list[list[int]]] | None = None
              ) -> Iterator[list[list[ChoiceDelta] | None]]:
        """Decode all jobs together; yield once per step a list over jobs: that job's new deltas (possibly
        empty), or None once the job finished (its last deltas, with finish_reason, came in an earlier yield)."""
        prompts = prompts if prompts is not None else [self.tokenize(j) for j in jobs]
        rows = [_Row(j, p * spec.n + k, ids, spec)
                for j, (spec, ids_list) in enumerate(zip(jobs, prompts))
                for p, ids in enumerate(ids_list) for k in range(spec.n)]
        by_key: dict[tuple[float, float], list[_Row]] = {}
        for r in rows:
            by_key.setdefault(_group_key(r.spec), []).append(r)
        streams = []
        for group in by_key.values():
            for b in pack_rows(group, self.n_ctx):
                for s in range(0, len(b), self.max_rows):
                    streams.append(self._decode(b[s:s + self.max_rows]))
        done = [False] * len(jobs)
        batch_rows = len(rows)
        while streams:
            out: list[list[ChoiceDelta] | None] = [None if d else [] for d in done]
            for s in list(streams):
                if next(s, None) is None:
                    streams.remove(s)
            for r in rows:
                if out[r.job] is not None and (d := r.delta(batch_rows)) is not None:
                    out[r.job].append(d)  # type: ignore[union-attr]
            yield out
            for j in range(len(jobs)):
                done[j] = done[j] or all(r.finish for r in rows if r.job == j)
            if all(done):
                return

    def _decode(self, rows: list[_Row]) -> Iterator[bool]:
        """Advance `rows` one token per `next()`; stops once every row has finished."""
        spec = rows[0].spec
        params = SamplingParams(max_new_tokens=max(r.spec.max_tokens for r in rows), temperature=spec.temperature,
                                top_p=spec.top_p if spec.temperature > 0 else 1.0)
        ids, mask = left_pad([r.prompt for r in rows], self.eos)
        for tokens, logprobs, _active in stream(self.model, ids, mask, params, eos_id=self.eos,
                                                seeds=[r.seed for r in rows]):
            for r, t, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
                if r.finish is None:
                    r.push(int(t), float(lp), self.eos, self.tok)
            yield True
            if all(r.finish for r in rows):
                return  # closing the generator frees the KV cache; rows past their max_tokens stop here
        for r in rows:  # the sampler ran max_new_tokens steps: a row that is still open ran out of length
            r.finish = r.finish or "length"

    def run(self, jobs: Sequence[Job]) -> list[list[ChoiceDelta]]:
        """Non-streaming: every job's choices, merged over all steps, sorted by index."""
        acc: list[dict[int, ChoiceDelta]] = [{} for _ in jobs]
        for out in self.steps(jobs):
            for j, deltas in enumerate(out):
                for d in deltas or []:
                    if d.index in acc[j]:
                        acc[j][d.index].merge(d)
                    else:
                        acc[j][d.index] = d
        return [[a[i] for i in sorted(a)] for a in acc]

    @torch.no_grad()
    def top_logprobs(self, prompt: list[int], completion: list[int], k: int, temperature: float
                     ) -> list[dict[str, float]]:
        """The k most likely tokens (decoded) and their log-probabilities at each completion position, under the
        same distribution the sampler reports, log softmax(logits / T) (T = 1 for greedy). One forward pass."""
        if k <= 0 or not completion:
            return [{} for _ in completion]
        ids = torch.tensor([prompt + completion[:-1]], device=self.model.lm_head.weight.device)
        logits = self.model(ids)[0, len(prompt) - 1:].float()
        logp = torch.log_softmax(tempered(logits, temperature), -1)
        vals, idx = logp.topk(min(k, logp.size(-1)), -1)
        return [{self.token_str(t): v for v, t in zip(vr.tolist(), ir.tolist()) if math.isfinite(v)}
                for vr, ir in zip(vals, idx)]


def prompt_token_count(prompts: Sequence[list[int]]) -> int:
    return sum(len(p) for p in prompts)


