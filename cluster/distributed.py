"""torch.distributed world for Ray Train workers: the rendezvous, and the DP × TP × PP topology with its groups.

Rendezvous. Ray Train's default `TorchConfig` rendezvous is a TCPStore, which binds every interface whatever
host it is given. On the embedded single-machine cluster we rendezvous through a FileStore instead
(`init_method="file://…"`) so nothing listens beyond loopback; on a real multi-node cluster (an address or
$RAY_ADDRESS) Ray Train's default is kept, since a file is not shared between machines.

Topology. Ranks are laid out like DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; the last
varies fastest): rank = (pipe · dp + data) · tp + model. Tensor-parallel peers are adjacent ranks (the most
communication-hungry axis gets the closest processes: Megatron-LM, Narayanan et al. 2021 §3), pipeline stages are
the farthest apart. `ParallelState` holds this rank's groups and doubles as DeepSpeed's `mpu` object, so
DeepSpeed reduces gradients over the data-parallel group only and counts tensor-sharded parameters once per
shard in the gradient norm.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TopologyError(ValueError):
    """The requested parallel layout does not fit the world size or the model; the message names the field."""


@dataclass(frozen=True)
class Topology:
    """A world of dp · tp · pp ranks."""

    dp: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise TopologyError(f"{name}: must be ≥ 1, got {getattr(self, name)}")

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> Topology:
        """DP = world / (TP · PP); raises TopologyError (naming the fields) if it does not divide."""
        if tp < 1 or pp < 1:
            raise TopologyError(f"parallel.tensor/parallel.pipeline: must be ≥ 1, got {tp}/{pp}")
        if world_size % (tp * pp):
            raise TopologyError(
                f"parallel.num_workers: world size {world_size} is not divisible by parallel.tensor × "
                f"parallel.pipeline = {tp} × {pp} = {tp * pp}")
        return cls(dp=world_size // (tp * pp), tp=tp, pp=pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pipe, data, model) coordinates of `rank`."""
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} outside world of {self.world_size}")
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank(self, pipe: int, data: int, model: int) -> int:
        return (pipe * self.dp + data) * self.tp + model

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, m) for m in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, m) for d in range(self.dp)] for p in range(self.pp) for m in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, m) for p in range(self.pp)] for d in range(self.dp) for m in range(self.tp)]

    def describe(self) -> str:
        lines = [f"world {self.world_size} = data {self.dp} × tensor {self.tp} × pipeline {self.pp}"]
        for r in range(self.world_size):
            p, d, m = self.coords(r)
            lines.append(f"  rank {r}: pipeline stage {p}, data-parallel rank {d}, tensor-parallel rank {m}")
        return "\n".join(lines)


class ParallelState:
    """This rank's place in the topology and its process groups (call collectively: every rank creates every
    group, in the same order, as `torch.distributed.new_group` requires).

    Implements DeepSpeed's `mpu` interface (get_{model,data}_parallel_{rank,world_size,group}); "model parallel"
    means tensor parallel here — pipeline stages are DeepSpeed's own `PipelineModule` topology.
    """

    def __init__(self, topology: Topology) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ParallelState: torch.distributed is not initialised (run inside a Ray Train worker)")
        if dist.get_world_size() != topology.world_size:
            raise TopologyError(f"parallel: topology needs {topology.world_size} ranks, the world has "
                                f"{dist.get_world_size()}")
        self.topology = topology
        self.rank = dist.get_rank()
        self.pipe_rank, self.data_rank, self.tensor_rank = topology.coords(self.rank)
        self.tp_group = self.dp_group = self.pp_group = None
        for kind, groups in (("tp", topology.tp_groups()), ("dp", topology.dp_groups()),
                             ("pp", topology.pp_groups())):
            for ranks in groups:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    setattr(self, f"{kind}_group", group)

    # DeepSpeed mpu interface --------------------------------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tensor_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_model_parallel_group(self) -> Any:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp

    def get_data_parallel_group(self) -> Any:
        return self.dp_group


# --- Ray Train backend with a FileStore rendezvous ---------------------------------------------------------------
def _worker_env(rendezvous_file: str | None) -> None:
    """Runs in each worker before init_process_group: loopback gloo; MASTER_* placeholders so DeepSpeed's
    `init_distributed` sees a complete env:// description and adopts the existing group instead of probing MPI."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")  # never bound: the process group already exists
    if rendezvous_file:
        os.environ["RAYGPT_RENDEZVOUS"] = rendezvous_file


def _make_filestore_config() -> Any:
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    class FileStoreBackend(_TorchBackend):
        """`_TorchBackend.on_start` with `file://` instead of env:// (TCPStore): see the module docstring."""

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            import ray

            resources = worker_group.get_resources_per_worker()
            backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
            directory = Path(backend_config.rendezvous_dir)
            directory.mkdir(parents=True, exist_ok=True)
            # A fresh file per worker-group start: a FileStore file left by a failed attempt would confuse the
            # restarted group's rendezvous.
            path = str(directory / f"store-{uuid.uuid4().hex}")
            self._rendezvous_file = path
            worker_group.execute(_worker_env, rendezvous_file=path)
            worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([
                worker_group.execute_single_async(
                    i, _setup_torch_process_group, backend=backend, world_rank=i, world_size=len(worker_group),
                    init_method=f"file://{path}", timeout_s=backend_config.timeout_s)
                for i in range(len(worker_group))
            ])

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            super().on_shutdown(worker_group, backend_config)
            path = getattr(self, "_rendezvous_file", None)
            if path:
                Path(path).unlink(missing_ok=True)

    @dataclass
    class FileStoreTorchConfig(TorchConfig):
        rendezvous_dir: str = ""

        @property
        def backend_cls(self) -> type:
            return FileStoreBackend

    return FileStoreTorchConfig


def torch_config(embedded: bool, rendezvous_dir: str | Path, use_gpu: bool = False, timeout_s: int = 600) -> Any:
    """The Ray Train `TorchConfig`: FileStore rendezvous in `rendezvous_dir` on the embedded cluster, Ray
    Train's default (TCPStore via env://) on a real cluster. gloo on CPU, nccl on GPU."""
    from ray.train.torch import TorchConfig

    backend = "nccl" if use_gpu else "gloo"
    if not embedded:
        return TorchConfig(backend=backend, timeout_s=timeout_s)
    cls = _make_filestore_config()
    return cls(backend=backend, timeout_s=timeout_s, rendezvous_dir=str(Path(rendezvous_dir).resolve()))


def clear_rendezvous(rendezvous_dir: str | Path) -> None:
    shutil.rmtree(rendezvous_dir, ignore_errors=True)
