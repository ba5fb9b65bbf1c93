"""The `raygpt` command: one subcommand per job module (`python -m jobs.<name>` runs the same code).

Every job module exposes `main(argv: list[str] | None) -> int`. Config-driven jobs build it with
`job_main(ConfigClass, run)`, which gives them `--config FILE.yaml`, `--set a.b=c` (repeatable),
`--dry-run` (print the resolved config and placement plan, start nothing) and a `--help` listing every field.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from jobs.config import ConfigError, help_lines, load_config, to_dict

T = TypeVar("T")

# subcommand -> module under jobs/
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("jobs.tokenizer", "train a byte-level BPE tokenizer on the corpus"),
    "prepare": ("jobs.prepare", "tokenise the corpus into Parquet shards (train/validation)"),
    "pretrain": ("jobs.pretrain", "pretrain a GPT on Ray Train + DeepSpeed"),
    "sft": ("jobs.sft", "supervised fine-tuning on demonstrations"),
    "comparisons": ("jobs.comparisons", "sample K responses per prompt and have the labeler rank them"),
    "rm": ("jobs.rm", "train the K-wise reward model"),
    "ppo": ("jobs.ppo", "PPO-ptx on Ray actors (policy, reference, reward, value)"),
    "eval": ("jobs.eval", "gold/proxy score, win rate, RM accuracy, perplexity"),
    "tune": ("jobs.tune", "Ray Tune (ASHA) sweep over a job's config fields"),
    "serve": ("jobs.serve", "serve checkpoints behind Ray Serve (OpenAI-compatible HTTP)"),
    "generate": ("jobs.generate", "print samples from a checkpoint"),
    "export": ("jobs.export", "export a checkpoint as a Hugging Face GPT-2 directory"),
    "import-hf": ("jobs.import_hf", "import a Hugging Face GPT-2 directory as a raygpt checkpoint"),
    "submit": ("jobs.submit", "submit a job to a Ray cluster (Job Submission API)"),
    "status": ("jobs.submit", "status of a submitted job"),
    "logs": ("jobs.submit", "logs of a submitted job"),
    "stop": ("jobs.submit", "stop a submitted job"),
    "demo": ("jobs.demo", "the whole InstructGPT pipeline on the embedded defaults"),
}


# Subcommands that are not config-driven jobs (they cannot be submitted, tuned or staged in the demo).
NOT_JOBS = {"submit", "status", "logs", "stop"}


@dataclass
class ResolvedJob:
    """A job's command line resolved locally, without running it: its config class, the validated config and
    its `run` function. Built by `resolve_job`, used by `raygpt submit` (validate before submitting) and
    `raygpt tune` (run trials with changed fields)."""

    command: str
    module: str
    cls: type | None  # None: the job has its own parser (validated through its --dry-run)
    cfg: Any
    run: Callable[[Any], Any] | None


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, cls: type, cfg: Any, run: Callable[[Any], Any]) -> None:
        super().__init__("captured")
        self.cls, self.cfg, self.run = cls, cfg, run


_capture = False


@contextlib.contextmanager
def _capturing() -> Iterator[None]:
    global _capture
    old, _capture = _capture, True
    try:
        yield
    finally:
        _capture = old


def job_module(command: str) -> str:
    """`pretrain` → `jobs.pretrain`; a dotted module path (`pkg.mod`) is taken as given (custom jobs)."""
    if command in COMMANDS:
        if command in NOT_JOBS:
            raise ConfigError(f"job: {command!r} is not a job (jobs: {', '.join(_job_names())})")
        return COMMANDS[command][0]
    if "." in command:
        return command
    raise ConfigError(f"job: unknown job {command!r} (jobs: {', '.join(_job_names())})")


def _job_names() -> list[str]:
    return [k for k in COMMANDS if k not in NOT_JOBS]


def resolve_job(command: str, argv: list[str] | None = None) -> ResolvedJob:
    """Parse and validate `raygpt <command> <argv>` exactly as the job would, but start nothing.

    Raises ConfigError naming the field for a bad spec (unknown field, wrong type, failed `validate`),
    a missing --config file, or a module that is not a config-driven job.
    """
    module_name = job_module(command)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"job: module {module_name} of {command!r} cannot be imported ({e})") from None
    if not callable(getattr(module, "main", None)):
        raise ConfigError(f"job: {module_name} has no main(argv)")
    err = io.StringIO()
    # `--dry-run` is appended for jobs with their own argument parser (e.g. serve's positional checkpoints):
    # job_main never gets that far in capture mode, and a parser without the flag refuses it (nothing runs).
    with _capturing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = module.main([*(argv or []), "--dry-run"])
        except _Captured as c:
            return ResolvedJob(command, module_name, c.cls, c.cfg, c.run)
        except SystemExit as e:  # argparse: bad flag (its message is in `err`)
            msg = err.getvalue().strip().splitlines()
            raise ConfigError(f"{command}: {msg[-1] if msg else f'invalid arguments (exit {e.code})'}") from None
    if rc in (0, None):  # validated by the job's own --dry-run; no config class to hand back
        return ResolvedJob(command, module_name, None, None, None)
    msg = err.getvalue().strip().splitlines()
    raise ConfigError(msg[-1].removeprefix("error: ") if msg else f"{command}: --dry-run failed (exit {rc})")


def job_main(
    cls: type[T],
    run: Callable[[T], Any],
    argv: list[str] | None = None,
    prog: str | None = None,
    plan: Callable[[T], str] | None = None,
) -> int:
    """Standard entry point of a config-driven job."""
    import yaml

    parser = argparse.ArgumentParser(
        prog=prog,
        description=inspect.cleandoc(cls.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in YAML or with --set NAME=VALUE):\n" + "\n".join(help_lines(cls)),
    )
    parser.add_argument("--config", help="YAML file with config fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and placement plan; start nothing")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _capture:  # resolve_job: hand the validated config back, run nothing
        raise _Captured(cls, cfg, run)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        if plan is not None:
            print("# placement plan")
            print(plan(cfg))
        return 0
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        width = max(len(k) for k in COMMANDS)
        print("usage: raygpt <command> [--config FILE.yaml] [--set KEY=VALUE ...] [--dry-run]\n")
        print("commands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; run `raygpt --help`", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    if cmd in {"status", "logs", "stop"}:
        rest = [cmd, *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
