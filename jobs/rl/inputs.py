"""Inputs of the PPO controller: tokenizer, prompt sets (the embedded task or a file), the gold labeler and the
PPO-ptx pretraining stream. Everything is checked before any actor starts, with errors that name the field."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines import check_engine
from actors.reward import import_function
from jobs.config import ConfigError
from jobs.data.corpus import DataError
from jobs.data.tasks import TaskError, build_task
from jobs.data.tasks.user_data import read_prompts
from jobs.data.tokens import TokenDataset
from jobs.rl.config import PPOJobConfig, abspath
from models.checkpoint import CheckpointError, read_config
from models.tokenizer import Tokenizer, TokenizerError

GoldFn = Callable[[list[str], list[str]], Sequence[float]]


def load_task(cfg: PPOJobConfig) -> Any:

    try:
        return build_task(cfg.task)
    except TaskError as e:
        raise ConfigError(str(e)) from None


def load_tokenizer(cfg: PPOJobConfig) -> tuple[Any, str]:

    path = cfg.tokenizer or str(Path(cfg.policy) / "tokenizer.json")
    where = "tokenizer" if cfg.tokenizer else "policy"
    try:
        tok = Tokenizer.from_file(path)
    except (TokenizerError, OSError) as e:
        raise ConfigError(f"{where}: cannot load the tokenizer {path} ({e})") from None
    return tok, abspath(path) or path


def model_config(path: str, field_name: str) -> Any:
    try:
        cfg, _, _ = read_config(path)
    except CheckpointError as e:
        raise ConfigError(f"{field_name}: {e}") from None
    return cfg


def check_checkpoints(cfg: PPOJobConfig) -> None:
    """The policy is an LM, the reward model a reward model, every model reads the same token ids, and the rollout
    engine can run the policy (vLLM installed, a model it computes the way our GPT does)."""
    check_engine(cfg.engine, cfg.policy)
    def read(path: str, name: str) -> tuple[Any, str]:
        try:
            model, kind, _ = read_config(path)
        except CheckpointError as e:
            raise ConfigError(f"{name}: {e}") from None
        return model, kind

    policy, kind = read(cfg.policy, "policy")
    if kind != "lm":
        raise ConfigError(f"policy: {cfg.policy} is a {kind!r} checkpoint, not a language model")
    models = [(f"rewards[{i}].model" if cfg.rewards else "reward_model", r.model) for i, r in enumerate(cfg.rewards)
              ] if cfg.rewards else [("reward_model", cfg.reward_model)]
    for name, path in (*models, ("value_init", cfg.value_init)):
        if path is None:
            continue
        other, kind = read(path, name)
        if name != "value_init" and kind != "reward":
            raise ConfigError(f"{name}: {path} is a {kind!r} checkpoint, not a reward model")
        if other.vocab_size != policy.vocab_size:
            raise ConfigError(f"{name}: vocabulary {other.vocab_size} differs from the policy's {policy.vocab_size} "
                              f"(they must share the tokenizer)")


@dataclass
class PromptSet:
    texts: list[str]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def load(cls, cfg: PPOJobConfig, tok: Any, split: str, source: str | None = None,
             limit: int | None = None) -> PromptSet:
        """Prompts of `split` from the task, the lines of a .txt file, or the prompts of a user data file
        (jobs/data/tasks/user_data.py `read_prompts`); encoded and checked against n_ctx."""
        source = source or cfg.prompts.source
        if source == "task":
            try:
                texts = list(load_task(cfg).prompts(split))
            except ValueError as e:
                raise ConfigError(f"prompts.split: {e}") from None
            where = f"prompts (task split {split!r})"
        elif source.endswith(".txt"):
            p = Path(source)
            if not p.is_file():
                raise ConfigError(f"prompts.source: no such file {source!r} (or use 'task')")
            texts = [ln.rstrip("\n") for ln in p.read_text().splitlines() if ln.strip()]
            where = f"prompts file {source}"
        else:  # user data (JSONL/Parquet file, directory or glob): messages are rendered with the chat template

            try:
                texts = read_prompts(source)
            except DataError as e:
                raise ConfigError(f"prompts.source: {e}") from None
            where = f"prompts file {source}"
        if limit is not None:
            texts = texts[:limit]
        if not texts:
            raise ConfigError(f"prompts.source: {where} has no prompts")
        ids = [encode_prompt(tok, t) for t in texts]
        n_ctx = model_config(cfg.policy, "policy").n_ctx
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) + cfg.sampling.max_new_tokens > n_ctx:
            raise ConfigError(f"sampling.max_new_tokens: prompt {longest} of {where} has {len(ids[longest])} tokens; "
                              f"+ {cfg.sampling.max_new_tokens} new tokens exceeds the policy's n_ctx={n_ctx}")
        return cls(texts, ids)


def encode_prompt(tok: Any, text: str) -> list[int]:
    """A prompt as the SFT model saw it: the text's tokens (an empty prompt becomes <|endoftext|>)."""
    return tok.encode(text) or [tok.eos_id]


def gold_function(cfg: PPOJobConfig) -> GoldFn | None:
    """The gold labeler for metrics: the task's (VADER), a 'module:callable', or None."""
    if cfg.gold is None:
        return None
    if cfg.gold == "task":
        return load_task(cfg).gold_scores
    return import_function(cfg.gold, "gold", ConfigError)


def ptx_dataset(cfg: PPOJobConfig, tok: Any) -> Any:
    """The PPO-ptx pretraining stream (train split of a prepared dataset), or None when ptx.coef is 0."""
    if cfg.ptx.coef <= 0:
        return None

    model = model_config(cfg.policy, "policy")
    if cfg.ptx.block_size > model.n_ctx:
        raise ConfigError(f"ptx.block_size: {cfg.ptx.block_size} exceeds the policy's n_ctx={model.n_ctx}")
    try:
        ds = TokenDataset(abspath(cfg.ptx.data) or "", "train", block_size=cfg.ptx.block_size, seed=cfg.seed)
    except (DataError, ValueError, OSError) as e:
        raise ConfigError(f"ptx.data: {e}") from None
    if ds.meta["vocab_size"] > model.vocab_size:
        raise ConfigError(f"ptx.data: dataset vocabulary {ds.meta['vocab_size']} is larger than the policy's "
                          f"{model.vocab_size}")
    if ds.meta.get("tokenizer", {}).get("sha256") not in (None, tok.sha256()):
        raise ConfigError(f"ptx.data: {cfg.ptx.data} was tokenized with another tokenizer "
                          f"({ds.meta['tokenizer'].get('path')}) than the policy's ({tok.source})")
    return ds
