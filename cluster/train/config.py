"""The typed config sections of the Ray Train jobs (pretrain, SFT, RM): the DP × TP × PP layout, checkpoints and
fault tolerance. The optimizer section (`OptimConfig`) is the DeepSpeed layer's (cluster/deepspeed_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.deepspeed_engine import OptimConfig
from cluster.faults import FaultPlan, Hold, StepFault
from models.config import ConfigError, field

__all__ = ["OptimConfig", "ParallelConfig", "FineTuneParallelConfig", "CheckpointConfig", "FailureConfig", "STATE_FILE"]

STATE_FILE = "trainer_state.json"


@dataclass
class ParallelConfig:
    """Workers and the DP × TP × PP layout (world = num_workers = data · tensor · pipeline)."""

    num_workers: int = field(1, help="Ray Train workers = torch.distributed world size (max when elastic)")
    min_workers: int | None = field(None, help="elastic: Ray Train may run with min_workers..num_workers "
                                               "(data parallel only; tensor = pipeline = 1)")
    elastic_interval_s: float = field(60.0, help="elastic: how often Ray Train checks whether the worker group "
                                                 "can grow (it restarts from the latest checkpoint to do so)")
    use_gpu: bool = field(False, help="one GPU per worker, nccl, bf16 (CPU: gloo, fp32)")
    cpus_per_worker: int = field(1, help="CPUs reserved per worker = torch threads per worker on CPU")
    tensor: int = field(1, help="tensor-parallel degree (Megatron column/row-parallel layers)")
    pipeline: int = field(1, help="pipeline stages (DeepSpeed PipelineModule; grad_accum micro-batches in flight)")
    pipeline_partition: str = field("parameters", help="pipeline stage balance: 'parameters', 'uniform' "
                                                       "(layers) or 'type:Block'")
    zero_stage: int = field(1, help="DeepSpeed ZeRO stage 0-3 (2 and 3 are refused with pipeline > 1)")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="auto = bf16 on GPU, fp32 on CPU")
    rendezvous: Literal["auto", "file", "tcp"] = field(
        "auto", help="torch.distributed rendezvous: auto = FileStore on a one-node cluster, else TCPStore")

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be ≥ 1, got {self.num_workers}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker: must be ≥ 1, got {self.cpus_per_worker}")
        if self.tensor < 1 or self.pipeline < 1:
            raise ConfigError(f"tensor/pipeline: must be ≥ 1, got {self.tensor}/{self.pipeline}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"zero_stage: ZeRO-{self.zero_stage} cannot be combined with pipeline={self.pipeline} (DeepSpeed "
                "refuses ZeRO-2/3 with pipeline parallelism: gradients and parameters would be partitioned "
                "across data-parallel ranks while stages exchange activations); use zero_stage 0 or 1")
        if self.precision == "bf16" and not self.use_gpu:
            pass  # allowed: bf16 works on CPU, only slower (docs/PRETRAIN.md)
        if self.num_workers % (self.tensor * self.pipeline):
            raise ConfigError(
                f"num_workers: world size {self.num_workers} is not divisible by tensor × pipeline = "
                f"{self.tensor} × {self.pipeline} = {self.tensor * self.pipeline}")
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.num_workers:
                raise ConfigError(f"min_workers: must be in [1, num_workers={self.num_workers}], got "
                                  f"{self.min_workers}")
            if self.min_workers < self.num_workers and (self.tensor > 1 or self.pipeline > 1):
                raise ConfigError("min_workers: elastic training is data-parallel only (tensor = pipeline = 1); "
                                  "a changing world would break the tensor/pipeline layout")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def data_parallel(self, world_size: int | None = None) -> int:
        return (world_size or self.num_workers) // (self.tensor * self.pipeline)

    def check_model(self, cfg: Any) -> None:
        """Model shape vs layout (`cfg` a models.config.GPTConfig): every rule that would otherwise fail inside
        a worker, raised here as ConfigError naming the field. T5 and ELMo configs: data parallel + ZeRO only
        (models.registry.check_parallel)."""
        from models.config import arch_of

        if arch_of(cfg) != "gpt":
            from models.registry import check_parallel

            check_parallel(arch_of(cfg), self.tensor, self.pipeline)
            return
        tp = self.tensor
        if tp > 1:
            if cfg.n_head % tp:
                raise ConfigError(f"parallel.tensor: model n_head={cfg.n_head} is not divisible by tensor={tp} "
                                  "(tensor parallelism splits attention by heads)")
            if cfg.inner_dim % tp:
                raise ConfigError(f"parallel.tensor: MLP width {cfg.inner_dim} is not divisible by tensor={tp}")
            if cfg.vocab_size % tp:
                raise ConfigError(f"parallel.tensor: vocab_size={cfg.vocab_size} is not divisible by tensor={tp} "
                                  "(the embedding and LM head are split by vocabulary rows)")
        if self.pipeline > cfg.n_layer:
            raise ConfigError(f"parallel.pipeline: {self.pipeline} stages but the model has only "
                              f"{cfg.n_layer} layers")


@dataclass
class FineTuneParallelConfig(ParallelConfig):
    """The engine's layout section defaulting to 2 data-parallel workers (one per core of the CPU default)."""

    num_workers: int = field(2, help="Ray Train workers = torch.distributed world size (max when elastic)")


@dataclass
class CheckpointConfig:
    """Exact-resume checkpoints (DeepSpeed state + RNG + data position) through Ray Train."""

    every_n_steps: int = field(50, help="save a checkpoint every N optimizer steps (and at the end)")
    keep: int = field(2, help="checkpoints kept by Ray Train (older ones are deleted)")
    resume_from: str | None = field(None, help="a checkpoint directory of an earlier run "
                                               "(runs/<name>/trainer_state/step-…) to continue from")

    def validate(self) -> None:
        if self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps: must be ≥ 1, got {self.every_n_steps}")
        if self.keep < 1:
            raise ConfigError(f"keep: must be ≥ 1, got {self.keep}")
        if self.resume_from is not None and not (Path(self.resume_from) / STATE_FILE).is_file():
            raise ConfigError(f"resume_from: {self.resume_from} is not a raygpt checkpoint (no {STATE_FILE})")


@dataclass
class FailureConfig:
    """Worker fault tolerance."""

    max_failures: int = field(1, help="restart from the latest checkpoint this many times after a worker "
                                      "failure (-1 = forever)")
    inject: list[str] = field([], help="chaos: 'rank:step' makes worker `rank` exit (os._exit, like an OOM kill) "
                                       "during optimizer step `step`, once per run (cluster/faults.py)")
    hold: list[str] = field([], help="for tests: 'dp:step:FILE' makes a worker group of data-parallel size dp "
                                     "wait before optimizer step `step` while FILE exists")

    def validate(self) -> None:
        self.plan()

    def plan(self, run_dir: str | Path | None = None) -> FaultPlan:
        """The fault plan of these settings; fired faults are recorded under run_dir/.faults (once per run)."""
        return FaultPlan(steps=tuple(StepFault.parse(s) for s in self.inject),
                         holds=tuple(Hold.parse(h) for h in self.hold),
                         ledger=str(Path(run_dir) / ".faults") if run_dir is not None else None)
