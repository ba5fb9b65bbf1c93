"""`raygpt generate CKPT --prompt TEXT ...`: print samples from a checkpoint (single process, no Ray)."""

from __future__ import annotations

import argparse
import sys

import torch

from models.checkpoint import CheckpointError, load_checkpoint, tokenizer_path
from models.generation import SamplingParams, generate
from models.tokenizer import Tokenizer, TokenizerError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raygpt generate", description="Print samples from a checkpoint directory.")
    p.add_argument("checkpoint", help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; default: <|endoftext|>)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint, kind="lm").eval()
        tok = Tokenizer.from_file(tokenizer_path(args.checkpoint))
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_samples < 1:
        print("error: --num-samples: must be >= 1", file=sys.stderr)
        return 2
    prompts = args.prompt or [""]
    encoded = [tok.encode(p) or [tok.eos_id] for p in prompts for _ in range(args.num_samples)]
    try:
        with torch.no_grad():
            out = generate(model, encoded, params, eos_id=tok.eos_id, seeds=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (ids, mask) in enumerate(zip(out.response_ids.tolist(), out.response_mask.tolist())):
        text = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])
        print(f"--- sample {i} | prompt: {prompts[i // args.num_samples]!r}")
        print(prompts[i // args.num_samples] + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
