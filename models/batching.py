"""Continuous batching at the row level for the native sampler (Yu et al. 2022, "Orca": iteration-level
scheduling): a row that ends (EOS or max_new_tokens) stops costing compute, and a waiting prompt takes its
KV-cache slot as soon as a whole group of n slots is free.

Cache layout (why positions and masks stay right with learned absolute positions). The KV cache is a fixed grid of
S slots × L columns; every decoding step writes all slots' new keys/values at one shared column `col` (so the
model's own `KVCache`/attention code is used unchanged). A row occupies a contiguous run of columns that ends at
`col`: exactly a left-padded row of an ordinary batch. A newcomer's prompt is prefilled on its own and its keys and
values are copied into the columns [col - P, col) of a free slot; the key mask over cache columns hides whatever
the slot held before, and the row's position ids are carried per slot (first real token = position 0), so a
newcomer's attention and positions equal those of the same prompt decoded alone. When `col` reaches L, the
columns are compacted (all live rows end at `col`, so one slice copy right-aligns them at their longest span);
when nothing waits and a quarter of the slots are dead, the dead slots are dropped (`KVCache.select`).

Group prefix sharing: the n samples of a prompt share its prefill — one forward pass per prompt, its keys/values
and last logits expanded n times (the samples differ only by their seeds).

On CPU the step multiplies with oneDNN-packed weights (`models.packed`, 2–3× faster skinny matmuls than the
row-major weights; `packed=False` uses the model's own linears).

Sampling is `models.generation.sample_next`, keyed by (row seed, row step), so a row's tokens are those of the same
row decoded alone, whatever its batch-mates and whenever it was admitted. Log-probs are those of the tempered,
unfiltered distribution, as the trainer's forward pass computes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.gpt import GPT, KVCache, attention_mask_4d
from models.packed import available, packed_twin
from models.sampling import SamplingParams, left_pad, sample_next

DROP_DEAD_FRACTION = 0.25  # drop dead slots once this share of the batch is dead and nothing waits
CACHE_BUDGET_BYTES = 4 * 2**30  # max_rows=None: as many slots as a 4 GiB KV cache holds


@dataclass
class Decoded:
    """Responses of R rows (row i·n + j = sample j of prompt i). N = max_new_tokens."""

    tokens: Tensor  # (R, N) int64, `pad` after a row's end
    logprobs: Tensor  # (R, N) fp32 log π(token) under softmax(tempered logits); 0 after a row's end
    lengths: Tensor  # (R,) generated tokens per row (EOS included)
    stats: dict[str, int] = field(default_factory=dict)  # prefills, decode_steps, column_shifts, slot_drops


class _Slots:
    """Per-slot state of the decode batch (S slots) over a KV cache of S × L columns."""

    def __init__(self, model: GPT, slots: int, columns: int, col: int) -> None:
        dev = model.lm_head.weight.device
        self.cache: KVCache = model.new_cache(slots, columns)
        for t in (*self.cache.k, *self.cache.v):  # masked columns must hold finite values: 0 · NaN = NaN in SDPA
            t.zero_()
        self.cache.length = col
        self.key_mask = torch.zeros((slots, columns), dtype=torch.long, device=dev)  # 1 = a real key
        self.position = torch.zeros(slots, dtype=torch.long, device=dev)  # position id of the next token fed
        self.token = torch.zeros(slots, dtype=torch.long, device=dev)  # last sampled token (fed next)
        self.row = torch.full((slots,), -1, dtype=torch.long, device=dev)  # output row held, -1 = none
        self.step = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens this row has generated
        self.seed = torch.zeros(slots, dtype=torch.long, device=dev)
        self.live = torch.zeros(slots, dtype=torch.bool, device=dev)

    @property
    def size(self) -> int:
        return self.live.numel()

    def keep(self, idx: Tensor) -> None:
        """Keep only slots `idx` (drop dead ones: their compute is wasted)."""
        self.cache.select(idx)
        for name in ("key_mask", "position", "token", "row", "step", "seed", "live"):
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def shift_columns(self, new_col: int) -> None:
        """Right-align every row at column `new_col` (all rows end at the shared column, so one slice copy)."""
        col = self.cache.length
        start = col - new_col
        for kv in (self.cache.k, self.cache.v):
            for t in kv:
                t[:, :, :new_col] = t[:, :, start:col].clone()
        self.key_mask[:, :new_col] = self.key_mask[:, start:col].clone()
        self.key_mask[:, new_col:] = 0
        self.cache.length = new_col


@torch.no_grad()
def decode(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, *, seeds: Tensor,
           eos_id: int | None = None, n: int = 1, max_rows: int | None = None, pad_id: int = 0,
           packed: bool | None = None, compile: bool = False) -> Decoded:
    """Sample n responses to each prompt with continuous batching over at most `max_rows` decode slots.

    prompts: G token lists; seeds (G·n,) int64, one per output row; `max_rows` None = all rows at once if their
    KV cache fits `CACHE_BUDGET_BYTES`, else as many as fit (always rounded up to n so that one group fits).
    Rows stop at `eos_id` (None: after max_new_tokens). `packed`: multiply with oneDNN-packed weights
    (`models.packed`; None = whenever available: fp32 on CPU). `compile`: run the decode step through
    `torch.compile` (inductor, dynamic shapes; excludes packed=True, which dynamo cannot trace). Off by default:
    on the 2-core CPU it costs ~25 s of compilation per process (cold cache) for `tiny` and is no faster than
    packed eager (docs/BENCHMARKS.md).
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    G, N = len(prompts), params.max_new_tokens
    R = G * n
    if G == 0:
        raise ValueError("prompts: empty batch")
    if seeds.shape != (R,):
        raise ValueError(f"seeds: expected {R} seeds (one per row = prompts × n), got {tuple(seeds.shape)}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows: must be >= 1, got {max_rows}")
    n_ctx = model.config.n_ctx
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt (encode at least one token, e.g. <|endoftext|>)")
        if len(p) + N > n_ctx:
            raise ValueError(f"prompts[{i}]: prompt ({len(p)}) + max_new_tokens ({N}) exceeds n_ctx={n_ctx}")
    dev = model.lm_head.weight.device
    seeds = seeds.to(dev)
    if compile and packed:
        raise ValueError("compile: the compiled decode step multiplies with the model's own weights; packed=True "
                         "cannot be combined with compile=True")
    if not compile and (packed if packed is not None else available(model)):
        model = packed_twin(model)  # type: ignore[assignment]
    step_forward = _compiled_forward() if compile else decode_forward
    longest = max(len(p) for p in prompts)
    # Columns: room for the longest row plus half as much slack (a compaction every ≥ span/2 steps).
    span = longest + N
    L = span + max(8, span // 2)
    if max_rows is None:  # every row at once, as far as the KV-cache budget allows
        per_slot = 2 * model.config.n_layer * L * model.config.n_embd * model.lm_head.weight.element_size()
        max_rows = max(1, int(CACHE_BUDGET_BYTES // per_slot))
    S = min(R, max(max_rows, n))
    slots = _Slots(model, S, L, col=longest)
    out_tokens = torch.full((R, N), pad_id, dtype=torch.long, device=dev)
    out_logprobs = torch.zeros((R, N), dtype=torch.float32, device=dev)
    out_len = torch.zeros(R, dtype=torch.long, device=dev)
    waiting = deque(range(G))
    admit_batch = max(n, S // 8)  # admit in batches: one prefill pass per batch of newcomers
    stats = dict(slots=S, prefills=0, prefill_rows=0, decode_steps=0, slot_steps=0, column_shifts=0, slot_drops=0)

    def record(rows: Tensor, step: Tensor, tokens: Tensor, logprobs: Tensor) -> Tensor:
        """Store the step's tokens of `rows`; returns which of them ended."""
        out_tokens[rows, step] = tokens
        out_logprobs[rows, step] = logprobs
        out_len[rows] = step + 1
        ended = step + 1 >= N
        if eos_id is not None:
            ended = ended | (tokens == eos_id)
        return ended

    while True:
        free = (~slots.live).nonzero().squeeze(-1)
        groups = min(len(waiting), free.numel() // n)
        if groups and (free.numel() >= min(admit_batch, len(waiting) * n) or not bool(slots.live.any())):
            _admit(model, slots, [waiting.popleft() for _ in range(groups)], free[:groups * n], prompts, params,
                   seeds, n, record)
            stats["prefills"] += 1
            stats["prefill_rows"] += groups
        live = slots.live
        if not bool(live.any()):
            if waiting:
                continue
            break
        n_live = int(live.sum())
        if not waiting and slots.size - n_live >= max(1, int(DROP_DEAD_FRACTION * slots.size)):
            slots.keep(live.nonzero().squeeze(-1))
            stats["slot_drops"] += 1
        if slots.cache.length >= L:  # no free column: right-align every row at its longest live span
            live_span = int(slots.position[slots.live].max())
            slots.shift_columns(max(longest, live_span))
            stats["column_shifts"] += 1
        _decode_step(model, slots, params, record, step_forward)
        stats["decode_steps"] += 1
        stats["slot_steps"] += slots.size
    return Decoded(out_tokens.cpu(), out_logprobs.cpu(), out_len.cpu(), stats)


def _admit(model: GPT, slots: _Slots, groups: list[int], free: Tensor, prompts: Sequence[Sequence[int]],
           params: SamplingParams, seeds: Tensor, n: int, record) -> None:  # type: ignore[no-untyped-def]
    """Prefill `groups` once each, copy their keys/values n times into the free slots (right-aligned at the
    shared column) and sample every newcomer's first token."""
    dev = slots.live.device
    ids, mask = left_pad([prompts[g] for g in groups], 0)
    ids, mask = ids.to(dev), mask.to(dev)
    k, P = ids.shape
    tmp = model.new_cache(k, P)
    hidden = model.transformer(ids, mask, cache=tmp)  # positions from the mask: first real token = 0
    logits = model.lm_head(hidden[:, -1]).repeat_interleave(n, 0)  # (k·n, V): the group's rows share it
    col = slots.cache.length
    for dst, src in ((slots.cache.k, tmp.k), (slots.cache.v, tmp.v)):
        for layer, t in enumerate(dst):
            t[free, :, col - P:col] = src[layer].repeat_interleave(n, 0)
    slots.key_mask[free] = 0
    slots.key_mask[free, col - P:col] = mask.repeat_interleave(n, 0)
    rows = (torch.as_tensor(groups, dtype=torch.long, device=dev)[:, None] * n
            + torch.arange(n, device=dev)).reshape(-1)
    step = torch.zeros_like(rows)
    tokens, logprobs = sample_next(logits, params, seeds[rows], step)
    ended = record(rows, step, tokens, logprobs)
    slots.row[free] = rows
    slots.seed[free] = seeds[rows]
    slots.step[free] = 1
    slots.position[free] = mask.sum(-1).repeat_interleave(n, 0)
    slots.token[free] = tokens
    slots.live[free] = ~ended


def decode_forward(model: GPT, tokens: Tensor, positions: Tensor, key_mask: Tensor, cache: KVCache) -> Tensor:
    """One decoding step of `GPTModel.forward` for the slot cache: tokens, positions (S,) → logits (S, V).

    The same modules in the same order (embeddings, blocks, final LayerNorm, unembedding); two things differ, and
    only in how the step is set up: positions come per slot (they are not the cache column), and the attention
    mask — `attention_mask_4d` over the cache columns — is built once per step as an additive float mask (given a
    boolean mask, SDPA converts it in every layer, which dominated small models' decode attention on CPU). The cache
    may be longer than n_ctx: columns are storage, positions stay < n_ctx."""
    body = model.transformer
    S = tokens.size(0)
    x = body.drop(body.wte(tokens[:, None]) + body.wpe(positions[:, None]))  # (S, 1, C)
    masks: dict[int | None, Tensor] = {}
    for block in body.h:
        window = block.attn.window
        if window not in masks:
            allowed = attention_mask_4d(key_mask, 1, cache.length, window, tokens.device, S)
            assert allowed is not None  # a cache is in use: past > 0
            masks[window] = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(
                ~allowed, float("-inf"))
        x = block(x, masks[window], cache)
    cache.length += 1
    return model.lm_head(body.ln_f(x[:, -1]))


_COMPILED: list[Callable[..., Tensor]] = []


def _compiled_forward() -> Callable[..., Tensor]:
    """`decode_forward` through torch.compile, built once per process (dynamo re-specialises per model)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(decode_forward, dynamic=True))
    return _COMPILED[0]


def _decode_step(model: GPT, slots: _Slots, params: SamplingParams, record,  # type: ignore[no-untyped-def]
                 forward: Callable[..., Tensor]) -> None:
    """Feed every slot's last token at the shared column; sample and record the live rows' next tokens."""
    col = slots.cache.length
    slots.key_mask[:, col] = slots.live.long()
    logits = forward(model, slots.token, slots.position, slots.key_mask[:, :col + 1], slots.cache)
    tokens, logprobs = sample_next(logits, params, slots.seed, slots.step)
    live = slots.live.nonzero().squeeze(-1)
    ended = record(slots.row[live], slots.step[live], tokens[live], logprobs[live])
    slots.token = tokens
    slots.step = slots.step + 1
    # a dead slot keeps its position (it must stay inside the position table until the slot is reused)
    slots.position = slots.position + slots.live.long()
    slots.live[live] = ~ended
