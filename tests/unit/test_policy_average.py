"""ppo.average_last: the policy exports the mean of its weights after each of the last N updates (tail averaging).

`actors.policy.PolicyWorker` runs on a real DeepSpeed engine in a one-rank gloo world (a spawned process, ~10 s).
Its `averaged_weights` is checked against the mean of the weights read after each update by hand, and survives a
save and a restore (a resumed run averages the same iterations); the job config maps N to the first averaged
iteration and rejects N outside [0, iterations].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from one_rank import run_one_rank

VOCAB = 61


def _body(path: str, state_dir: str) -> dict[str, Any]:
    from actors.base import load_model, sample_rollout
    from actors.policy import PolicySpec, PolicyWorker, PPOUpdateSpec
    from cluster.deepspeed_engine import EngineSpec, OptimConfig, full_state_dict
    from models.generation import SamplingParams

    sampling = SamplingParams(max_new_tokens=5, temperature=1.0)
    rollout = sample_rollout(load_model(path, "lm"), [[1, 2, 3], [4, 5]], [0, 1], [0, 1], sampling, 0, 0, "")
    rollout = rollout.replace(advantages=torch.randn(rollout.action_mask.shape,
                                                     generator=torch.Generator().manual_seed(1)))
    optim = OptimConfig.constant(1e-2, weight_decay=0.0, grad_clip=0.0, micro_batch_size=2)

    def worker(average_from: int | None) -> Any:
        w = PolicyWorker(PolicySpec(path, EngineSpec(optim, precision="fp32"), sampling, 0,
                                    PPOUpdateSpec(epochs=1, minibatch_size=2, average_from=average_from)))
        w.setup()
        return w

    def state(w: Any) -> dict[str, np.ndarray]:
        return {k: v.clone().numpy() for k, v in full_state_dict(w.engine).items()}

    out: dict[str, Any] = {"after": []}
    w = worker(average_from=1)
    for it in range(3):  # updates 0, 1, 2: the average covers 1 and 2
        w.update(rollout, None, iteration=it)
        out["after"].append(state(w))
    out["averaged"] = w.averaged_weights().state
    out["last"] = w.weights().state
    w.save(state_dir, "iter-000003")
    restored = worker(average_from=1)
    restored.setup((state_dir, "iter-000003"))
    out["restored"] = restored.averaged_weights().state
    for x in (w, restored):  # one more update on each: both average 1, 2 and 3
        x.update(rollout, None, iteration=3)
    out["after"].append(state(w))
    out["continued"], out["restored_continued"] = w.averaged_weights().state, restored.averaged_weights().state
    off = worker(average_from=None)
    off.update(rollout, None, iteration=0)
    out["off"], out["off_last"] = off.averaged_weights().state, off.weights().state
    return out


def test_averaged_weights_are_the_mean_of_the_last_updates_and_survive_a_restore(tmp_path) -> None:
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT

    torch.manual_seed(0)
    cfg = GPTConfig.from_name("nano", vocab_size=VOCAB, eos_token_id=0, bos_token_id=0)
    path = str(save_checkpoint(GPT(cfg), tmp_path / "sft", kind="lm"))
    out = run_one_rank(_body, path, str(tmp_path / "state"))

    after = out["after"]
    names = list(after[0])
    # every update moved the weights, so the mean differs from the last weights
    assert all(not np.allclose(after[i][n], after[i + 1][n]) for i in range(3) for n in names[:1])
    for n in names:
        np.testing.assert_allclose(out["averaged"][n], (after[1][n] + after[2][n]) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(out["last"][n], after[2][n])
        np.testing.assert_array_equal(out["restored"][n], out["averaged"][n])
        want = (after[1][n] + after[2][n] + after[3][n]) / 3
        np.testing.assert_allclose(out["continued"][n], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out["restored_continued"][n], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(out["off"][n], out["off_last"][n])  # off: the last weights
    assert any(not np.allclose(out["averaged"][n], after[2][n]) for n in names)


def test_average_last_maps_to_the_first_averaged_iteration_and_is_bounded() -> None:
    from jobs.config import ConfigError, from_dict
    from jobs.rl.config import PPOJobConfig, role_specs

    cfg = from_dict(PPOJobConfig, {"iterations": 40, "ppo": {"average_last": 10}})
    assert role_specs(cfg, 0, "tok.json", 1, 1).policy.update.average_from == 30  # iterations 30..39 (0-based)
    off = from_dict(PPOJobConfig, {"iterations": 40})
    assert role_specs(off, 0, "tok.json", 1, 1).policy.update.average_from is None
    for bad in (-1, 41):
        with pytest.raises(ConfigError, match="ppo.average_last"):
            from_dict(PPOJobConfig, {"iterations": 40, "ppo": {"average_last": bad}})
