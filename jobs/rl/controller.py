"""The PPO controller's machinery: cluster wiring, stages with timeouts and recovery, checkpoints, metrics.

`jobs/ppo.py` holds the loop; this module holds what each line of it does.

Stages. A stage submits its calls to one or more role groups and waits on small metadata objects (never on the
rollouts themselves) with `fault.stage_timeout_s`. If a worker died (RayActorError / ActorUnavailableError) or
hung (timeout), its whole group is restarted — a data-parallel world cannot continue with a member missing —,
reloaded from the last checkpoint (policy/value engines, the rollout workers' weights), and only that group's part
of the stage is resubmitted with the same inputs. Inputs are ObjectRefs owned by this controller, so they outlive
any worker. Because every random draw is a pure function of (seed, iteration, row/rank), the retried stage
reproduces what the lost one would have computed. Rollout workers are elastic instead (`_reconcile_rollout`,
cluster/elastic.py): a lost one is dropped and only its shards are resubmitted, to the survivors; workers join at
the start of a generate stage when the cluster has room.

Checkpoints. After every iteration: the policy and value engines (DeepSpeed: weights + optimizer state), then the
controller state (iteration, KL controller, weights version/checksum, the trajectory-defining config), then the
iteration's metrics row (appended), then the `latest` pointer — files written to a temporary name and renamed, the
pointer last, so a crash at any moment leaves the previous checkpoint intact and `resume` neither skips nor repeats
a row. The same checkpoint is what fault recovery reloads and what `resume` continues.
RNG: the prompt order, sampling seeds, minibatch order and dropout seeds derive from (seed, iteration, …), so the
iteration number *is* the RNG state.

Longer than 400 lines because every stage goes through one recovery loop over one shared state (the role groups,
the weights version and checksum, the last checkpoint tag, the timings); split across modules, that state would
have to travel with every call.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.base import RolloutMeta, ScoreMeta
from actors.groups import PolicyGroup, PromptShard, ReferenceGroup, RewardGroup, RolloutGroup, ValueGroup
from actors.policy import UpdateResult, WeightsInfo, n_steps
from actors.rollout import finalize
from cluster.faults import ActorFault
from cluster.metrics import MetricsWriter, read_metrics
from cluster.placement import create_pools, remove_pools
from cluster.runtime import init_ray, is_embedded
from jobs.config import ConfigError, to_dict
from jobs.rl.async_rollouts import AsyncRollouts
from jobs.rl.config import PPOJobConfig, RoleSpecs, abspath, parse_fault, role_specs
from jobs.rl.final import export_policy, heldout_eval, write_report
from jobs.rl.gold import gold_score
from jobs.rl.inputs import PromptSet, check_checkpoints, gold_function, load_tokenizer, ptx_dataset
from jobs.rl.monitor import Monitor
from jobs.rl.staleness import StaleWeightsError, check_staleness
from jobs.runs import start_run
from models.advantages import AdaptiveKLController, FixedKLController
from models.files import write_atomic
from models.seeding import derive_seed, stream_slice

# Config fields that shape the trajectory: a resumed run must not change them (iterations, timeouts, faults,
# placement layout and the cluster address may change).
TRAJECTORY_FIELDS = ("seed", "algorithm", "group_size", "batch_size", "policy", "reward_model", "reward_function",
                     "rewards", "value_init", "sampling", "kl", "ppo", "loss", "ptx", "task", "prompts.source",
                     "prompts.split", "mitigation", "max_staleness")


class StageFailed(RuntimeError):
    """A stage kept failing after `fault.max_stage_retries` restarts."""


def check_weights(metas: list[RolloutMeta], expected: WeightsInfo) -> None:
    """Refuse any shard sampled with another weights version or checksum than the policy's (no silent staleness;
    the synchronous case of `check_staleness`, max_staleness = 0)."""
    check_staleness(metas, {expected.version: expected.checksum}, expected.version, 0)


def _same_weights(infos: list[WeightsInfo], what: str) -> WeightsInfo:
    """All data-parallel ranks must hold identical weights; anything else is a broken world."""
    if any(i != infos[0] for i in infos):
        raise RuntimeError(f"{what}: data-parallel policy ranks disagree on their weights: {infos}")
    return infos[0]


def _finalize_task(n: int, options: dict[str, Any], *items: Any) -> tuple[Any, ...]:
    """Ray task body: items = n rollouts, n ref log-probs, n scores[, n values] (resolved by Ray from refs; no values
    for a critic-free algorithm)."""
    parts = [list(items[k * n:(k + 1) * n]) for k in range(len(items) // n)]
    shards, ref_lp, scores = parts[:3]
    values = parts[3] if len(parts) == 4 else None
    stats, outputs = finalize(shards, ref_lp, scores, values, **options)
    return (stats, *[shard for out in outputs for shard in out])


def prompt_order(n_prompts: int, seed: int, iteration: int, batch: int) -> list[int]:
    """Prompt indices of an iteration: an endless stream of per-epoch permutations, position = iteration·batch."""
    return [int(i) for i in stream_slice(n_prompts, iteration * batch, batch, seed)]


def _dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


def _write_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename (models/files.py): the `latest` pointer names a complete state even after a
    SIGKILL or a power cut, and it is written only after the engines' saves have returned."""

    write_atomic(path, text)


@dataclass
class Batch:
    """Finalized rollout shards for the trainers (one ObjectRef per rank)."""

    policy: list[Any]
    value: list[Any]


class Controller(AsyncRollouts):
    """Owns the groups, the KL controller, checkpoints and metrics. Used as a context manager by `jobs/ppo.run`."""

    def __init__(self, cfg: PPOJobConfig) -> None:

        self.cfg = cfg
        check_checkpoints(cfg)
        self.spec = cfg.placement_spec()
        self.tok, self.tokenizer_path = load_tokenizer(cfg)
        self.prompts_train = PromptSet.load(cfg, self.tok, cfg.prompts.split)
        self.gold = gold_function(cfg)
        self.ptx = ptx_dataset(cfg, self.tok)
        self.n_policy = self.spec.roles["policy"].replicas
        # Critic-free algorithms place no value role (cfg.validate refuses one).
        self.n_value = self.spec.roles["value"].replicas if "value" in self.spec.roles else 0
        self.generator_role, self.n_gen = cfg.generators(self.spec)
        self.specs: RoleSpecs = role_specs(cfg, self.tok.eos_id, self.tokenizer_path, self.n_policy, self.n_value)
        self.kl = (AdaptiveKLController(cfg.kl.init_beta, cfg.kl.target, cfg.kl.horizon)
                   if cfg.kl.controller == "adaptive" else FixedKLController(cfg.kl.init_beta))
        self.faults = [parse_fault(f) for f in cfg.fault.inject]
        if any(f.role == "rollout" for f in self.faults) and self.generator_role != "rollout":
            raise ConfigError("fault.inject: role 'rollout' has no replicas in this placement")
        if any(f.role == "value" for f in self.faults) and not self.n_value:
            raise ConfigError(f"fault.inject: algorithm {cfg.algorithm} places no value role")
        self.fired: set[ActorFault] = set()
        self.run_dir = cfg.run_dir()
        self.state_dir = self.run_dir / "trainer_state"
        self.start_iteration = 0
        self.tag: str | None = None  # checkpoint the workers reload on failure (None: their initial checkpoints)
        self.recoveries = 0
        self._async_init()  # timings (a StageClock: durations and spans), rollouts in flight (max_staleness)
        self._prepare_run_dir()

    # --- run directory / resume -------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        latest = self.state_dir / "latest"
        if cfg.resume:
            if not latest.is_file():
                raise ConfigError(f"resume: {latest} does not exist (nothing to resume in {self.run_dir})")
            self.tag = latest.read_text().strip()
            state = json.loads((self.state_dir / "controller" / f"{self.tag}.json").read_text())
            saved, now = state["config"], to_dict(cfg)
            for key in TRAJECTORY_FIELDS:
                old, new = _dotted(saved, key), _dotted(now, key)
                if old != new:
                    raise ConfigError(f"{key}: differs from the run being resumed ({old!r} → {new!r}); only "
                                      f"iterations, evaluation, placement layout, faults and timeouts may change")
            for role, n in (("policy", self.n_policy), ("value", self.n_value)):
                saved_n = state["replicas"].get(role, 0)
                if saved_n != n:
                    raise ConfigError(f"placement.replicas.{role}: the checkpoint was written by {saved_n} ranks, "
                                      f"got {n}")
            self.start_iteration = int(state["iteration"])
            self.kl.load_state_dict(state["kl"])
            self.resumed_weights = WeightsInfo(**state["weights"])
            self.resume_in_flight(state, self.start_iteration, self.resumed_weights.version)
            # Rows logged after this checkpoint by the interrupted run are redone now: drop them.
            rows = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= self.start_iteration]
            _write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        else:
            for stale in (self.state_dir, self.run_dir / "metrics.jsonl", self.run_dir / "tb"):
                if stale.exists():
                    print(f"[ppo] starting fresh: replacing {stale}", flush=True)
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        start_run(cfg, cfg.name, cfg.runs_root)
        self.metrics = MetricsWriter(self.run_dir)
        self.monitor = Monitor(cfg, self.metrics)  # held-out evaluation during training, stop rule (issue 17)

    # --- cluster ----------------------------------------------------------------------------------------------
    def __enter__(self) -> Controller:

        self._started_ray = not ray.is_initialized()
        init_ray(self.cfg.address, num_cpus=self.cfg.num_cpus)
        self.pools = create_pools(self.spec, timeout_s=min(self.cfg.fault.stage_timeout_s, 120.0),
                                  name_prefix=f"ppo-{self.cfg.name}")
        kw = dict(rendezvous="file" if is_embedded(self.cfg.address) else "tcp",
                  rendezvous_dir=str(self.run_dir / ".rendezvous"), max_restarts=self.cfg.fault.max_restarts,
                  timeout_s=self.cfg.fault.stage_timeout_s)

        def faults(role: str) -> set[str]:  # the methods fault.inject will arm on this role (usually none)
            return {f.method for f in self.faults if f.role == role}

        s = self.specs
        self.groups: dict[str, Any] = {}
        try:
            self.policy = self.groups["policy"] = PolicyGroup(s.policy, self.spec, self.pools,
                                                              faults=faults("policy"), **kw)
            self.reference = self.groups["reference"] = ReferenceGroup(s.reference, self.spec, self.pools,
                                                                       faults=faults("reference"), **kw)
            self.reward = self.groups["reward"] = RewardGroup(s.reward, self.spec, self.pools,
                                                              faults=faults("reward"), **kw)
            self.value = None
            if self.n_value:
                self.value = self.groups["value"] = ValueGroup(s.value, self.spec, self.pools,
                                                               faults=faults("value"), **kw)
            self.rollout = None
            if self.spec.rollout is not None:  # elastic: its own placement group per worker (cluster/elastic.py)
                self.rollout = self.groups["rollout"] = RolloutGroup(
                    s.rollout, self.spec.rollout, name_prefix=f"ppo-{self.cfg.name}", faults=faults("rollout"),
                    timeout_s=self.cfg.fault.stage_timeout_s)
            t0 = time.perf_counter()
            for g in self.groups.values():
                g.ready()
            self._setup("policy")
            self._setup("value")
            if self.cfg.resume and self.expected != self.resumed_weights:
                raise RuntimeError(f"resume: policy weights {self.expected} differ from the checkpoint's record "
                                   f"{self.resumed_weights}")
            self.timings["startup"] = time.perf_counter() - t0
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for g in getattr(self, "groups", {}).values():
            try:
                g.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out; the pools are removed next
                pass
        remove_pools(getattr(self, "pools", {}))
        shutil.rmtree(self.run_dir / ".rendezvous", ignore_errors=True)  # FileStore files
        self.metrics.close()
        if getattr(self, "_started_ray", False):

            ray.shutdown()

    def _snapshot(self, role: str) -> tuple[str, str] | None:
        return None if self.tag is None else (str((self.state_dir / role).resolve()), self.tag)

    def _setup(self, role: str) -> None:
        """(Re)build a trainer group's engines from the last checkpoint; re-sync rollout workers."""
        if role == "policy":
            self.expected = _same_weights(self.policy.get(self.policy.setup(self._snapshot("policy"))), "setup")
            self._sync_rollout()
        elif role == "value" and self.value is not None:
            self.value.get(self.value.setup(self._snapshot("value")))

    def _sync_rollout(self, joined: list[Any] | None = None) -> None:
        """Send the policy's weights to every rollout worker (after a setup or an update: a fresh message), or
        the current message to the workers that just `joined`; each must report the policy's version + checksum.
        A worker lost meanwhile is dropped: the pool goes on with the others (the next generate reconciles)."""
        if self.rollout is None:
            return
        t0 = time.perf_counter()
        if joined is None:
            self._weights = self.policy.weights()  # kept: a worker joining later loads the same message
        lost = []
        for worker, ref in self.rollout.load_weights(self._weights, joined):
            try:
                version, checksum = self.rollout.get(ref)
            except (RayActorError, ActorUnavailableError):
                lost.append(worker)
                continue
            if (version, checksum) != (self.expected.version, self.expected.checksum):
                raise StaleWeightsError(f"weight_version: a rollout worker loaded version {version} "
                                        f"({checksum[:12]}…), the policy is at {self.expected}")
        self.rollout.drop(lost)
        if joined is None:  # a join is timed as part of the reconcile
            self.timings["sync"] = time.perf_counter() - t0

    def _reconcile_rollout(self, check_alive: bool = True) -> None:
        """Grow or shrink the rollout pool to what the cluster holds now (cluster/elastic.py: dead workers out,
        new ones in wherever a placement group was placed, at least `min`); joiners load the current weights.
        `check_alive=False` where workers may be busy (generations submitted ahead): the dead then surface as
        failed calls, which `_recover` drops."""
        t0 = time.perf_counter()
        joined = self.rollout.reconcile(check_alive)
        if joined:
            self._sync_rollout(joined)
        self.rollout_workers = len(self.rollout)
        self.timings["reconcile"] = time.perf_counter() - t0

    def _member_lost(self, refs: list[Any]) -> bool:
        """Whether any of these calls failed because its actor died (rather than with an exception of its own)."""

        for ref in refs:
            try:
                ray.get(ref, timeout=self.cfg.fault.stage_timeout_s)
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                return True
            except Exception:  # noqa: BLE001 - this call's own error; look at the others
                continue
        return False

    def _recover(self, role: str, timed_out: bool) -> None:
        self.recoveries += 1
        if role == "rollout":  # elastic: drop the lost (or hung) workers; their shards go to the survivors
            self.rollout.drop(self.rollout.lost_in_generate(hung=timed_out))
            if len(self.rollout) < self.rollout.spec.min:
                self._reconcile_rollout()  # waits for room for `min` workers (up to the stage timeout)
            return
        group = self.groups[role]
        if group.distributed or timed_out:
            group.replace()  # a DP world (or a hung replica) cannot be patched: fresh processes, fresh world
        else:
            group.ready()  # Ray restarts a crashed independent replica by itself (max_restarts): wait for it
        self._setup(role)

    def _arm(self, it: int, stage: str, roles: Collection[str]) -> None:
        """Arm the planned faults of this stage before submitting it: the worker crashes inside the stage's call."""
        for fault in self.faults:
            if (fault.iteration, fault.stage) == (it, stage) and fault not in self.fired and fault.role in roles:
                self.fired.add(fault)
                print(f"[ppo] fault injection: {fault.role}[0] will exit mid-call during {stage} of iteration {it}",
                      flush=True)
                # An update dies right after its first optimizer step, leaving half-updated weights behind.
                self.groups[fault.role].arm_fault(fault.method, after_engine_steps=1 if stage == "update" else None)

    # --- stages -----------------------------------------------------------------------------------------------
    def _stage(self, it: int, stage: str, calls: dict[str, Callable[[], tuple[list[Any], Any]]],
               during: Callable[[], None] | None = None) -> dict[str, tuple[list[Any], Any]]:
        """Submit every role's part (call → (refs to wait on, outputs)), then wait; recover + resubmit on failure.

        Returns role → (waited results, outputs)."""

        t0 = time.perf_counter()
        self._arm(it, stage, calls)
        submitted = {role: call() for role, call in calls.items()}
        if during is not None:
            during()
        out: dict[str, tuple[list[Any], Any]] = {}
        for role, call in calls.items():
            wait, outputs = submitted[role]
            for attempt in range(self.cfg.fault.max_stage_retries + 1):
                try:
                    out[role] = (ray.get(wait, timeout=self.cfg.fault.stage_timeout_s), outputs)
                    break
                except (RayActorError, ActorUnavailableError, GetTimeoutError, RayTaskError) as e:
                    # A rank whose peer died fails inside a collective ("connection reset"): that is the peer's
                    # failure, not a bug. Any other exception raised by worker code is re-raised — retrying it
                    # would only repeat it.
                    if isinstance(e, RayTaskError) and not self._member_lost(wait):
                        raise
                    if attempt == self.cfg.fault.max_stage_retries:
                        raise StageFailed(f"{stage}: the {role} group failed {attempt + 1} times in iteration {it}; "
                                          f"last error: {type(e).__name__}: {e}") from e
                    print(f"[ppo] iteration {it} {stage}: {role} worker lost ({type(e).__name__}); restarting the "
                          f"{role} group, reloading its last state and retrying the stage", flush=True)
                    self._recover(role, timed_out=isinstance(e, GetTimeoutError))
                    wait, outputs = call()
        self.timings[stage] = time.perf_counter() - t0
        return out

    def prompts(self, it: int) -> list[PromptShard]:
        """This iteration's prompts, cut into `n_gen` contiguous shards (one per policy rank, or as many as the
        rollout workers' maximum, however many are alive; at most one per prompt) of whole groups: a replica
        samples all G = group_size responses of its prompts, sharing each prompt's prefill, so every algorithm's
        groups stay whole. Per-row seeds: row g·G + j is sample j of prompt g, seeded by (seed, iteration, row) —
        a pure function of (iteration, prompt, sample), independent of the sharding and of the worker count."""
        order = prompt_order(len(self.prompts_train), self.cfg.seed, it, self.cfg.batch_size)
        ids = [self.prompts_train.ids[r] for r in order]
        G = self.cfg.group_size
        seeds = [derive_seed(self.cfg.seed, it, row) for row in range(len(ids) * G)]
        n = min(self.n_gen, len(ids)) if self.generator_role == "rollout" else self.n_gen  # DP ranks: one each
        bounds = [i * len(ids) // n for i in range(n + 1)]
        return [PromptShard(ids[a:b], list(range(a * G, b * G)), seeds[a * G:b * G], n=G)
                for a, b in zip(bounds, bounds[1:])]

    def generate(self, it: int, shards: list[PromptShard]) -> list[Any]:
        if self.rollout is not None:
            self._reconcile_rollout()
            rollout, attempts = self.rollout, []

            def call() -> tuple[list[Any], Any]:  # a retry resubmits only the lost workers' shards
                pairs = rollout.generate(shards, retry=bool(attempts))
                attempts.append(1)
                return [m for m, _ in pairs], [r for _, r in pairs]
        else:
            policy = self.policy
            self.rollout_workers = 0

            def call() -> tuple[list[Any], Any]:
                pairs = policy.generate(shards)
                return [m for m, _ in pairs], [r for _, r in pairs]

        metas, refs = self._stage(it, "generate", {self.generator_role: call})[self.generator_role]
        check_weights(metas, self.expected)
        self.rollout_bytes = sum(m.nbytes for m in metas)
        return refs

    def score(self, it: int, rollouts: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        def split(pairs: list[tuple[Any, Any]]) -> tuple[list[Any], Any]:
            return [m for m, _ in pairs], [p for _, p in pairs]

        calls = {
            "reference": lambda: split(self.reference.compute_logprobs(rollouts)),
            "reward": lambda: split(self.reward.score(rollouts)),
        }
        if self.value is not None:  # the critic's values (PPO); critic-free algorithms have none
            value = self.value
            calls["value"] = lambda: split(value.compute_values(rollouts))
        res = self._stage(it, "score", calls)
        metas: list[ScoreMeta] = res["reward"][0]
        rows = max(1, sum(m.rows for m in metas))
        self.proxy_reward = sum(m.mean * m.rows for m in metas) / rows
        # Per reward component (unweighted means, `reward/<name>` in metrics.jsonl).
        self.reward_components = {f"reward/{k}": sum(m.components[k] * m.rows for m in metas) / rows
                                  for k in (metas[0].components if metas else {})}
        return res["reference"][1], res["reward"][1], res["value"][1] if "value" in res else None

    def advantages(self, rollouts: list[Any], ref_logprobs: list[Any], scores: list[Any], values: list[Any] | None
                   ) -> tuple[Batch, dict[str, float]]:
        """One Ray task over the whole batch: the algorithm's estimator (cfg.estimator), β·KL in the reward unless
        the algorithm puts it in the loss (GRPO)."""

        t0 = time.perf_counter()
        splits = [self.n_policy] if self.n_policy == self.n_value or not self.n_value \
            else [self.n_policy, self.n_value]
        cfg = self.cfg
        options = dict(beta=self.kl.beta, kl_estimator=cfg.kl.estimator, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
                       whiten_advantages=cfg.ppo.whiten_advantages, splits=splits, estimator=cfg.estimator,
                       group_size=cfg.group_size, scale=cfg.loss.group_scale, kl_in_reward=not cfg.kl_in_loss)
        task = ray.remote(_finalize_task).options(num_cpus=0, num_returns=1 + sum(splits), max_retries=2)
        refs = task.remote(len(rollouts), options, *rollouts, *ref_logprobs, *scores, *(values or []))
        stats = dict(ray.get(refs[0], timeout=self.cfg.fault.stage_timeout_s))
        stats["beta"] = self.kl.beta
        stats.update(getattr(self, "reward_components", {}))
        policy = list(refs[1:1 + self.n_policy])
        value = list(refs[1 + self.n_policy:]) if len(splits) == 2 else policy
        self.timings["advantages"] = time.perf_counter() - t0
        return Batch(policy, value), stats

    def _ptx_shards(self, it: int) -> list[Any]:
        """Per policy rank: (steps, rows, block+1) pretraining blocks for iteration `it`, put separately."""

        if self.ptx is None:
            return [None] * self.n_policy
        upd = self.specs.policy.update
        steps = n_steps(self.cfg.rows // self.n_policy, upd)
        blocks = np.stack([self.ptx.batch_at(it * steps + s, self.cfg.ptx.batch_size) for s in range(steps)])
        per = self.cfg.ptx.batch_size // self.n_policy
        return [ray.put(np.ascontiguousarray(blocks[:, r * per:(r + 1) * per])) for r in range(self.n_policy)]

    def update(self, it: int, batch: Batch, rollouts: list[Any]) -> dict[str, float]:
        ptx = self._ptx_shards(it)
        self.gold_reward: float | None = None
        # Gold score: a task on the rollout refs (jobs/rl/gold.py) while the trainers work; only its float comes back.
        gold_ref = None if self.gold is None else ray.remote(gold_score).options(num_cpus=0, max_retries=2).remote(
            self.cfg, *rollouts)

        def gold() -> None:
            if gold_ref is not None:
                self.gold_reward = float(ray.get(gold_ref, timeout=self.cfg.fault.stage_timeout_s))

        # β of a KL loss term (GRPO): the same controller's β that KL-in-reward algorithms put in the reward.
        kl_coef = self.kl.beta if self.cfg.kl_in_loss else 0.0
        calls = {"policy": lambda: (refs := self.policy.update(batch.policy, ptx, it, kl_coef), refs)}
        if self.value is not None:
            value = self.value
            calls["value"] = lambda: (refs := value.update(batch.value, it), refs)
        res = self._stage(it, "update", calls, during=gold)
        results: list[UpdateResult] = res["policy"][0]
        self.expected = _same_weights([r.weights for r in results], "update")
        self.weights_seen()
        if self.rollout is not None:
            self._sync_rollout()
        return {**_mean([r.metrics for r in results]), **(_mean(res["value"][0]) if "value" in res else {})}

    # --- checkpoint / metrics ---------------------------------------------------------------------------------
    def checkpoint(self, it: int, update: dict[str, float], redo: Callable[[], dict[str, float]]
                   ) -> tuple[str, dict[str, float]]:
        """Save the engines and the controller state under a new tag; `commit` makes it `latest` once the
        iteration's metrics row is written (a kill in between redoes the iteration on resume, never skips its row).

        A trainer rank that dies after its update returned and before its save ended takes the iteration's
        weights with it: every trainer group is reloaded from the last checkpoint and `redo` (this iteration's
        update, same inputs and seeds) recomputes them before saving again. Returns (tag, the update's metrics)."""
        t0 = time.perf_counter()
        tag = f"iter-{it + 1:06d}"
        policy_dir, value_dir = self.state_dir / "policy", self.state_dir / "value"
        self._arm(it, "checkpoint", self.groups)
        for attempt in range(self.cfg.fault.max_stage_retries + 1):
            saves = self.policy.save(str(policy_dir.resolve()), tag)
            if self.value is not None:
                saves += self.value.save(str(value_dir.resolve()), tag)
            try:
                self.policy.get(saves)
                break
            except (RayActorError, ActorUnavailableError, RayTaskError) as e:
                if (isinstance(e, RayTaskError) and not self._member_lost(saves)) \
                        or attempt == self.cfg.fault.max_stage_retries:
                    raise
                print(f"[ppo] iteration {it} checkpoint: a trainer worker was lost ({type(e).__name__}); reloading "
                      f"the trainers from the last checkpoint and redoing this iteration's update", flush=True)
                for role in ("policy", "value"):
                    if role in self.groups:
                        self._recover(role, timed_out=False)
                update = redo()
        ctl_dir = self.state_dir / "controller"
        ctl_dir.mkdir(parents=True, exist_ok=True)
        state = {"iteration": it + 1, "kl": self.kl.state_dict(), "seed": self.cfg.seed,
                 "prompt_position": (it + 1) * self.cfg.batch_size,
                 "weights": {"version": self.expected.version, "checksum": self.expected.checksum},
                 "replicas": {"policy": self.n_policy, "value": self.n_value}, "config": to_dict(self.cfg),
                 **self.save_in_flight(it)}  # rollouts generated ahead (max_staleness >= 1), on disk
        _write_atomic(ctl_dir / f"{tag}.json", json.dumps(state, indent=1))
        self.tag = tag
        self.timings["checkpoint"] = time.perf_counter() - t0
        return tag, update

    def commit(self, tag: str) -> None:
        """Point `latest` at `tag` (after its iteration's row is logged), then drop checkpoints beyond
        `keep_checkpoints`."""
        _write_atomic(self.state_dir / "latest", tag + "\n")
        ctl_dir = self.state_dir / "controller"
        tags = sorted(p.stem for p in ctl_dir.glob("iter-*.json"))
        for old in tags[:-self.cfg.keep_checkpoints]:
            for d in (self.state_dir / "policy" / old, self.state_dir / "value" / old):
                shutil.rmtree(d, ignore_errors=True)
            (ctl_dir / f"{old}.json").unlink(missing_ok=True)

    def log(self, it: int, stats: dict[str, float], update: dict[str, float], seconds: float) -> dict[str, Any]:
        work = sum(self.timings.get(k, 0.0) for k in ("generate", "score", "advantages", "update", "sync"))
        row = self.metrics.write(
            it + 1, iteration=it + 1, gold_reward=self.gold_reward, proxy_reward=stats["proxy_reward"],
            **{k: v for k, v in stats.items() if k != "proxy_reward"}, **update,
            **{f"time_{k}": round(v, 4) for k, v in self.timings.items() if k != "startup"},
            time_iteration=round(seconds, 4), samples_per_s=self.cfg.rows / max(work, 1e-9),
            rollout_bytes=self.rollout_bytes, recoveries=self.recoveries, weight_version=self.expected.version,
            rollout_workers=self.rollout_workers,
            **self.staleness_metrics(),
            engine=self.cfg.engine if self.generator_role == "rollout" else "native")
        gold = "   n/a" if self.gold_reward is None else f"{self.gold_reward:+.3f}"
        print(f"[ppo] iter {it + 1}/{self.cfg.iterations}  gold {gold}  proxy {stats['proxy_reward']:+.3f}  "
              f"kl {stats['kl']:.3f}  β {stats['beta']:.4f}  entropy {update.get('entropy', 0):.2f}  "
              f"clipfrac {update.get('clipfrac', 0):.3f}  {row['samples_per_s']:.1f} samples/s", flush=True)
        return row

    def watch(self, it: int, stats: dict[str, float]) -> bool:
        """After iteration `it`: the periodic held-out evaluation (a Ray task on the policy's weights) and the
        stop rule; True = end the run now (jobs/rl/monitor.py)."""
        return self.monitor.step(it, stats, self.policy.weights)

    def finish(self) -> dict[str, Any]:
        """Export the final policy as an HF checkpoint, evaluate on held-out prompts, write the report."""

        # A task on the weights ref, on this node (the run directory's): the weights never pass through the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        export = ray.remote(export_policy).options(num_cpus=0, scheduling_strategy=here, max_retries=1)
        # ppo.average_last: the tail average of the weights (PolicyWorker.averaged_weights), else the last ones.
        weights = self.policy.averaged_weights() if self.cfg.ppo.average_last else self.policy.weights()
        checkpoint = ray.get(export.remote(weights, self.cfg, self.run_dir / "checkpoint",
                                           self.tokenizer_path), timeout=self.cfg.fault.stage_timeout_s)
        summary: dict[str, Any] = {"checkpoint": str(checkpoint), "iterations": self.cfg.iterations,
                                   "recoveries": self.recoveries, "startup_s": round(self.timings.get("startup", 0), 2)}
        summary.update(self.monitor.summary())  # waits for evaluations still running; stopped_at, stop_reason
        if self.cfg.prompts.eval_size > 0:
            summary["eval"] = heldout_eval(self.cfg, self.tok, checkpoint, abspath(self.cfg.policy) or "", self.gold)
        write_report(self.run_dir, summary)
        return summary
