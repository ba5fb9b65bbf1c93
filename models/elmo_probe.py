"""A downstream probe on frozen ELMo features (Peters et al. 2018 §3.3): the biLM is fixed; the task model learns
the scalar mix (s, γ) over the layers and a small classifier on top. Comparing a probe over all L+1 layers with
one over layer 0 alone (the context-independent token representation) measures what context adds — the claim of
§5 ("contextual features help").

Sequence-level labels (e.g. one label per verse line): token features are mean-pooled over each row's real
tokens (`pool_layers`) before mixing (mixing is linear and per-layer, so mix-then-pool = pool-then-mix).
Pure torch; full-batch Adam on a fixed seed, so a probe is a deterministic function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.elmo import ScalarMix


def pool_layers(layers: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens: layers (J, B, T, D), attention_mask (B, T) → (B, J, D)."""
    m = attention_mask.to(layers.dtype)[None, :, :, None]
    pooled = (layers * m).sum(2) / m.sum(2).clamp(min=1.0)
    return pooled.transpose(0, 1)


class Probe(nn.Module):
    """features (N, J, D) → logits (N, classes): ScalarMix over the J layers, then a linear classifier
    (`hidden` = 0, logistic regression) or a one-hidden-layer ReLU MLP."""

    def __init__(self, n_layers: int, dim: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.mix = ScalarMix(n_layers)
        self.classifier = nn.Linear(dim, num_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.mix(features.transpose(0, 1)))


@dataclass
class ProbeResult:
    probe: Probe
    train_accuracy: Tensor  # 0-d
    test_accuracy: Tensor  # 0-d
    mix_weights: Tensor  # (J,) softmax(s), sums to 1
    gamma: Tensor  # 0-d


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose argmax equals the label: logits (N, C), labels (N,) → 0-d."""
    return (logits.argmax(-1) == labels).float().mean()


def train_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                hidden: int = 0, steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4,
                seed: int = 0) -> ProbeResult:
    """Fit a Probe on frozen features train_x (N, J, D) with labels train_y (N,) in [0, num_classes) by full-batch
    Adam on the cross-entropy; report train/test accuracy and the learned mix. Features are standardised with
    the training set's per-dimension mean/std (the same for every layer count, so comparisons are fair)."""
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dim() != 3 or y.shape != x.shape[:1]:
            raise ValueError(f"{name}: features must be (N, J, D) with labels (N,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name}: labels must lie in [0, {num_classes})")
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = Probe(train_x.shape[1], train_x.shape[2], num_classes, hidden)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(probe(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ProbeResult(probe, accuracy(probe(train_x), train_y), accuracy(probe(test_x), test_y),
                           probe.mix.weights.detach().clone(), probe.mix.gamma.detach().clone())
