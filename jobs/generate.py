"""`raygpt generate CKPT --prompt TEXT ...`: print samples from a checkpoint (single process, no Ray)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from actors.engines import make_engine
from jobs.cli import Arg, JobSpec
from jobs.config import ConfigError, field
from jobs.data.examples import encode_prompt
from models.checkpoint import CheckpointError, tokenizer_path
from models.generation import SamplingParams
from models.tokenizer import Tokenizer, TokenizerError


@dataclass
class GenerateConfig:
    """Print samples from a checkpoint directory (positional: CHECKPOINT)."""

    checkpoint: str = field("", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    prompts: list[str] = field([], help="prompt texts (default: one empty prompt = <|endoftext|>)")
    num_samples: int = field(1, help="samples per prompt")
    sampling: SamplingParams = field(SamplingParams(max_new_tokens=48, temperature=0.8), help="sampling")
    seed: int = field(0, help="row i of the batch is seeded with seed + i")
    engine: str = field("native", help="rollout engine: 'native' or 'vllm' (the `vllm` extra)")

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: give a checkpoint directory (raygpt generate CHECKPOINT)")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")


def run(cfg: GenerateConfig) -> list[str]:
    try:
        tok = Tokenizer.from_file(tokenizer_path(cfg.checkpoint))
        engine = make_engine(cfg.engine, cfg.checkpoint)
    except (CheckpointError, TokenizerError) as e:
        raise ConfigError(f"checkpoint: {e}") from None
    prompts = cfg.prompts or [""]
    encoded = [encode_prompt(tok, p) for p in prompts]
    seeds = [cfg.seed + i for i in range(len(prompts) * cfg.num_samples)]
    try:
        with torch.no_grad():
            out = engine.generate(encoded, cfg.sampling, eos_id=tok.eos_id, seeds=seeds, n=cfg.num_samples)
    except ValueError as e:  # a prompt longer than the context names max_new_tokens / the prompt
        raise ConfigError(str(e)) from None
    texts = []
    for i, (ids, mask) in enumerate(zip(out.response_ids.tolist(), out.response_mask.tolist())):
        text = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])
        prompt = prompts[i // cfg.num_samples]
        print(f"--- sample {i} | prompt: {prompt!r}")
        print(prompt + text)
        texts.append(text)
    return texts


JOB = JobSpec(GenerateConfig, run, "raygpt generate", args=(
    Arg(("checkpoint",), "checkpoint", "checkpoint directory"),
    Arg(("--prompt",), "prompts", "prompt text (repeatable)", kind="append"),
    Arg(("-n", "--num-samples"), "num_samples", "samples per prompt", type=int),
    Arg(("--max-tokens",), "sampling.max_new_tokens", "new tokens per sample", type=int),
    Arg(("--temperature",), "sampling.temperature", "0 = greedy", type=float),
    Arg(("--top-k",), "sampling.top_k", "top-k filter (0 = off)", type=int),
    Arg(("--top-p",), "sampling.top_p", "nucleus filter (1 = off)", type=float),
    Arg(("--seed",), "seed", "sampling seed", type=int)))
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
