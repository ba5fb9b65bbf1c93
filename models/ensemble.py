"""A reward-model ensemble checkpoint (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"): N reward models trained on the same comparisons with different seeds.

Format (docs/CHECKPOINTS.md): member 0 is an ordinary reward checkpoint directory; its `ensemble.json` lists the
other members' directories, relative to it. So every reader of one reward model (evaluation's proxy score, the
value role's initialisation, transformers) reads member 0 unchanged, and a reader that wants the ensemble —
`load_ensemble`, PPO with `mitigation.ensemble` — expands it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoint import CheckpointError, load_checkpoint

ENSEMBLE_FILE = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def ensemble_members(path: str | Path) -> list[Path]:
    """Member directories, member 0 (`path` itself) first; [path] for a single reward model. CheckpointError
    naming ensemble.json for a member that does not exist."""
    path = Path(path)
    if not is_ensemble(path):
        return [path]
    data = json.loads((path / ENSEMBLE_FILE).read_text())
    members = [path, *[(path / m).resolve() for m in data.get("members", [])]]
    for m in members[1:]:
        if not (m / "config.json").is_file():
            raise CheckpointError(f"{path / ENSEMBLE_FILE}: member {m} is not a checkpoint directory")
    return members


def write_ensemble(path: str | Path, others: Sequence[str | Path], seeds: Sequence[int] = ()) -> Path:
    """Make the reward checkpoint at `path` member 0 of an ensemble with `others` (stored relative to `path`)."""
    path = Path(path)
    data = {"members": [Path(os.path.relpath(Path(o).resolve(), path.resolve())).as_posix() for o in others],
            "seeds": list(seeds)}
    tmp = path / (ENSEMBLE_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path / ENSEMBLE_FILE)
    return path / ENSEMBLE_FILE


class RewardEnsemble(nn.Module):
    """M reward models scoring the same sequences. `forward(ids, mask)` → (M, B) member scores."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("members: an ensemble needs at least one reward model")
        self.members = nn.ModuleList(members)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return torch.stack([m(input_ids, attention_mask) for m in self.members])


def conservative_score(scores: Tensor, k: float) -> Tensor:
    """(M, B) member scores → (B,) mean − k·std over members (population std: M = 1 gives the score itself).
    k = 0 is the plain ensemble mean; k > 0 the lower-confidence bound of Coste et al. §3 ("uncertainty-weighted
    optimisation"), which pays less for responses the members disagree on."""
    return scores.mean(0) - k * scores.std(0, correction=0)


def load_ensemble(path: str | Path) -> RewardEnsemble:
    """Every member of the ensemble checkpoint at `path` (one for a plain reward checkpoint), in eval mode."""
    return RewardEnsemble([load_checkpoint(m, kind="reward") for m in ensemble_members(path)]).eval()
