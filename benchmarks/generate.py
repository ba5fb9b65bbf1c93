"""Sampler throughput: raygpt's KV-cached batched sampler vs `transformers` GPT2LMHeadModel.generate with the
same weights, batch 32, 64 new tokens, KV cache in both, same sampling settings, one process. Goal ≥ 2× HF."""

from __future__ import annotations

import torch
import transformers

from benchmarks.common import PeakRSS, timed, write_section
from models.checkpoint import from_hf_state_dict
from models.config import GPTConfig
from models.generation import SamplingParams, generate
from models.gpt import GPT

BATCH, NEW, PROMPT = 32, 64, 16


def pair(cfg: GPTConfig) -> tuple[GPT, transformers.GPT2LMHeadModel]:
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head)).eval()
    ours = GPT(cfg).eval()
    sd = from_hf_state_dict(hf.state_dict())
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    ours.load_state_dict(sd)
    return ours, hf


def bench(preset: str) -> tuple[float, float, float]:
    cfg = GPTConfig.from_name(preset, n_ctx=128)
    ours, hf = pair(cfg)
    prompts = torch.randint(1, cfg.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    # No EOS stop in either, so both generate exactly NEW tokens per row.
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=50)

    def run_ours() -> None:
        out = generate(ours, prompts, params, seeds=0)
        assert out.response_ids.shape == (BATCH, NEW)

    def run_hf() -> None:
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=50,
                              temperature=1.0, max_new_tokens=NEW, min_new_tokens=NEW, use_cache=True,
                              pad_token_id=0)
        assert out.shape == (BATCH, PROMPT + NEW)

    t_ours = timed(run_ours, repeats=3)
    t_hf = timed(run_hf, repeats=3)
    tokens = BATCH * NEW
    return tokens / t_ours, tokens / t_hf, (tokens / t_ours) / (tokens / t_hf)


def main() -> None:
    # One intra-op thread for both: on a shared 2-core box, OpenMP threads that spin-wait for a descheduled
    # peer make every small op 10x slower and the ratio meaningless (see docs/BENCHMARKS.md).
    torch.set_num_threads(1)
    rows = []
    with PeakRSS() as rss:
        for preset in ("tiny", "gpt2"):
            ours, theirs, ratio = bench(preset)
            print(f"{preset}: raygpt {ours:,.0f} tok/s, HF {theirs:,.0f} tok/s, ratio {ratio:.2f}x", flush=True)
            rows.append(f"| {preset} | {ours:,.0f} | {theirs:,.0f} | **{ratio:.2f}×** |")
    body = (
        f"Batch {BATCH}, prompt {PROMPT} tokens, {NEW} new tokens, top-k 50 sampling, KV cache in both, same "
        f"weights, 1 torch thread each; best of 3 after a warm-up. Goal ≥ 2× HF.\n\n"
        "| model | raygpt tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\nPeak RSS of the benchmark process: {rss.peak_gib:.2f} GiB."
    )
    write_section("Sampler: raygpt vs transformers generate (benchmarks/generate.py)", body)


if __name__ == "__main__":
    main()
