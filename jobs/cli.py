"""The `raygpt` command: one subcommand per job module (`python -m jobs.<name>` runs the same code).

Every job module is a thin leaf that declares `JOB = JobSpec(ConfigClass, run, ...)` and `main = JOB.main`.
A `JobSpec` gives the job `--config FILE.yaml`, `--set a.b=c` (repeatable), `--dry-run` (print the resolved config
and placement plan, start nothing), a `--help` listing every field with its default, and optional positional
arguments / convenience flags that are nothing but other spellings of config fields (`raygpt serve CKPT` sets
`models`, `--max-tokens 5` sets `sampling.max_new_tokens`). `resolve_job` parses a command line exactly as the job
would and hands back the validated config and `run` — what `raygpt submit` (validate before submitting), `raygpt
tune` (trials with changed fields) and `raygpt demo` (stages) use.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import yaml

from jobs.config import ConfigError, help_lines, load_config, to_dict

T = TypeVar("T")

# subcommand -> (module under jobs/, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("jobs.tokenizer", "train a byte-level BPE tokenizer on the corpus"),
    "prepare": ("jobs.prepare", "tokenise the corpus into Parquet shards (train/validation)"),
    "pretrain": ("jobs.pretrain", "pretrain a GPT on Ray Train + DeepSpeed"),
    "sft": ("jobs.sft", "supervised fine-tuning on demonstrations"),
    "comparisons": ("jobs.comparisons", "sample K responses per prompt and have the labeler rank them"),
    "rm": ("jobs.rm", "train the K-wise reward model"),
    "dpo": ("jobs.dpo", "DPO / IPO from the comparisons, against a frozen SFT reference"),
    "ppo": ("jobs.ppo", "PPO-ptx on Ray actors (policy, reference, reward, value)"),
    "eval": ("jobs.eval", "gold/proxy score, win rate, RM accuracy, perplexity"),
    "tune": ("jobs.tune", "Ray Tune (ASHA) sweep over a job's config fields"),
    "serve": ("jobs.serve", "serve checkpoints behind Ray Serve (OpenAI-compatible HTTP)"),
    "generate": ("jobs.generate", "print samples from a checkpoint"),
    "export": ("jobs.export", "export a checkpoint as a Hugging Face directory"),
    "import-hf": ("jobs.import_hf", "import a Hugging Face GPT-2 directory as a raygpt checkpoint"),
    "submit": ("jobs.submit", "submit a job to a Ray cluster (Job Submission API)"),
    "status": ("jobs.submit", "status of a submitted job"),
    "logs": ("jobs.submit", "logs of a submitted job"),
    "stop": ("jobs.submit", "stop a submitted job"),
    "demo": ("jobs.demo", "the whole InstructGPT pipeline on the embedded defaults"),
}

# Subcommands that are not config-driven jobs (they cannot be submitted, tuned or staged in the demo).
NOT_JOBS = {"submit", "status", "logs", "stop"}


@dataclass(frozen=True)
class Arg:
    """A command-line spelling of a config field: a positional argument (`name` without dashes) or a flag."""

    names: tuple[str, ...]  # ("checkpoint",) or ("-n", "--num-samples")
    field: str  # dotted config field it sets
    help: str = ""
    kind: Literal["one", "many", "append"] = "one"  # one value; positional nargs="*"; repeatable flag
    type: Callable[[str], Any] = str


@dataclass(frozen=True)
class JobSpec(Generic[T]):
    """A config-driven job: its config class, its `run(cfg)`, and how the command line maps onto the config."""

    config: type[T]
    run: Callable[[T], Any]
    prog: str
    plan: Callable[[T], str] | None = None
    args: tuple[Arg, ...] = ()
    epilog: str = ""

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog, description=inspect.cleandoc(self.config.__doc__ or ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="config fields (set in YAML or with --set NAME=VALUE):\n" + "\n".join(help_lines(self.config))
            + (f"\n\n{self.epilog}" if self.epilog else ""))
        for a in self.args:
            kw: dict[str, Any] = {"help": a.help or f"sets {a.field}", "type": a.type}
            if a.names[0].startswith("-"):
                kw.update(dest=_dest(a), action="append" if a.kind == "append" else "store")
            elif a.kind == "many":
                kw["nargs"] = "*"
            parser.add_argument(*a.names, **kw)
        parser.add_argument("--config", help="YAML file with config fields")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="dotted override, e.g. --set optim.lr=3e-4 (repeatable)")
        parser.add_argument("--dry-run", action="store_true",
                            help="print the resolved config and placement plan; start nothing")
        return parser

    def parse(self, argv: Sequence[str] | None) -> tuple[T, bool]:
        """(validated config, dry_run). argparse exits on a malformed command line; a bad value raises
        ConfigError naming the field."""
        ns = self.parser().parse_args(list(argv) if argv is not None else None)
        values: dict[str, Any] = {}
        for a in self.args:
            v = getattr(ns, _dest(a) if a.names[0].startswith("-") else a.names[0])
            if v is not None and v != []:
                values[a.field] = v
        return load_config(self.config, ns.config, ns.set, values=values), ns.dry_run

    def main(self, argv: Sequence[str] | None = None) -> int:
        try:
            cfg, dry_run = self.parse(argv)
            if dry_run:
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
                if self.plan is not None:
                    print("# placement plan")
                    print(self.plan(cfg))
                return 0
            self.run(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0


def _dest(a: Arg) -> str:
    return "arg_" + a.names[-1].lstrip("-").replace("-", "_")


@dataclass
class ResolvedJob:
    """A job's command line resolved locally, without running it: its spec, the validated config and `run`."""

    command: str
    module: str
    cls: type
    cfg: Any
    run: Callable[[Any], Any]


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


def job_spec(command: str) -> tuple[str, JobSpec[Any]]:
    """(module name, its JOB) for a job command or a custom job's dotted module path."""
    module_name = job_module(command)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"job: module {module_name} of {command!r} cannot be imported ({e})") from None
    spec = getattr(module, "JOB", None)
    if not isinstance(spec, JobSpec):
        raise ConfigError(f"job: {module_name} declares no JOB = JobSpec(Config, run, ...)")
    return module_name, spec


def resolve_job(command: str, argv: Sequence[str] | None = None) -> ResolvedJob:
    """Parse and validate `raygpt <command> <argv>` exactly as the job would, but start nothing.

    Raises ConfigError naming the field for a bad spec (unknown field, wrong type, failed `validate`), a missing
    --config file, an unknown flag, or a module that is not a config-driven job."""
    module_name, spec = job_spec(command)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # argparse's message becomes the ConfigError's
            cfg, _ = spec.parse(list(argv or []))
    except SystemExit as e:  # a malformed command line (argparse exits)
        lines = err.getvalue().strip().splitlines()
        raise ConfigError(f"{command}: {lines[-1].removeprefix(spec.prog + ': ').removeprefix('error: ')}"
                          if lines else f"{command}: invalid arguments (exit {e.code})") from None
    return ResolvedJob(command, module_name, spec.config, cfg, spec.run)


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
