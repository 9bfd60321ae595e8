"""One training step, top to bottom: pick prompts -> sample them (guidance plans, re-samples,
injects) -> shape rewards -> collate a batch -> reference log-probs -> advantages -> update ->
metrics. The step never looks at the recipe's name: the config chose the functions, and every
Completion carries its own routing.

Metrics are namespaced: `reward/`, `guide/`, `loss/` (each objective term), `policy/` (entropy,
clip fractions, KL to the behaviour policy, gradient norm, response lengths), `time/`, `perf/`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from guidedrl import algo
from guidedrl.algo.reward_shaping import groups_with_signal, overlong_penalty
from guidedrl.core import dist
from guidedrl.core.console import console
from guidedrl.core.errors import UserError
from guidedrl.core.types import CORRECT, AdvantageInputs, Batch, Completion, Sample
from guidedrl.guidance.protocol import StepInfo
from guidedrl.trainer.batch import collate
from guidedrl.trainer.build import Pieces
from guidedrl.trainer.collect import collect
from guidedrl.trainer.update import NonFiniteError, old_values, reference_logprobs, update


class TrainingError(UserError):
    """A run that cannot go on for a reason the user can act on (e.g. dynamic sampling starved)."""


@dataclass
class StepState:
    """What persists across steps (and into checkpoints) besides model and optimizer."""

    step: int = 0
    solved: set[str] = field(default_factory=set)
    nonfinite_in_row: int = 0
    generated_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "solved": sorted(self.solved), "nonfinite_in_row": self.nonfinite_in_row,
                "generated_tokens": self.generated_tokens}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepState":
        return cls(d["step"], set(d["solved"]), d["nonfinite_in_row"], d.get("generated_tokens", 0))


def step_info(p: Pieces, step: int) -> StepInfo:
    """The guidance's view of the step; its rng is seeded by the step, so a resumed run is exact."""
    return StepInfo(step=step, total_steps=max(1, p.cfg.train.steps), rng=random.Random(p.cfg.train.seed * 7_919 + step))


def _my_share(items: list[Sample]) -> list[Sample]:
    """This process's contiguous slice of a list every process drew alike (all of it with one process)."""
    per = len(items) // dist.world_size()
    return items[dist.rank() * per : (dist.rank() + 1) * per]


def _rollout(p: Pieces, info: StepInfo, n: int, seed: int, offset: int) -> list[list[Completion]]:
    """n prompts of this process sampled into scored, reward-shaped groups."""
    samples = _my_share(p.selector.next(n * dist.world_size()))  # all processes draw the same prompts
    groups = collect(samples, p.services, p.guide, info, group_size=p.cfg.rollout.group_size, seed=seed,
                     group_offset=offset)
    shape_rewards(p, groups)
    return groups


def sample_groups(p: Pieces, st: StepState) -> tuple[list[list[Completion]], dict[str, float]]:
    """One step's groups; with dynamic sampling, only groups with reward signal, refilled (DAPO)."""
    cfg, ds = p.cfg, p.cfg.algo.dynamic_sampling
    n = cfg.train.prompts_per_step // dist.world_size()  # this process's share
    seed = cfg.train.seed * 1_000_003 + st.step * 101 + dist.rank() * 7_919
    info = step_info(p, st.step)
    groups = _rollout(p, info, n, seed, 0)
    if not ds.enabled:
        return groups, {}
    kept = [g for g in groups if _has_signal(g)]
    rounds = 1
    while len(kept) < n and rounds < ds.max_batches:
        kept += [g for g in _rollout(p, info, n, seed + rounds, rounds * 100_000) if _has_signal(g)]
        rounds += 1
    if len(kept) < n and (ds.on_short == "error" or not kept):
        raise TrainingError(
            f"step {st.step}: dynamic sampling kept {len(kept)}/{n} groups with reward signal after "
            f"{rounds} rounds (algo.dynamic_sampling.max_batches={ds.max_batches}). Raise max_batches, set "
            "algo.dynamic_sampling.on_short=partial, or use easier data."
        )
    return kept[:n], {"perf/sampling_rounds": float(rounds), "perf/kept_groups": float(min(len(kept), n))}


def _has_signal(group: list[Completion]) -> bool:
    return bool(groups_with_signal(torch.tensor([c.reward for c in group]), torch.zeros(len(group), dtype=torch.long)).all())


def shape_rewards(p: Pieces, groups: list[list[Completion]]) -> None:
    """Reward transforms that depend on the completion, not the task (DAPO's overlong penalty)."""
    ol = p.cfg.reward.overlong
    if ol is None:
        return
    flat = [c for g in groups for c in g]
    lengths = torch.tensor([len(c.ids) for c in flat], dtype=torch.float32)
    pen = overlong_penalty(lengths, p.cfg.rollout.max_new_tokens, ol.cache_len, ol.factor)
    for c, x in zip(flat, pen.tolist(), strict=True):
        c.reward_info["reward/overlong"] = x
        c.reward += x


def compute_advantages(p: Pieces, batch: Batch) -> None:
    """Fill batch.advantages (and returns and old values for a critic)."""
    a = p.cfg.algo
    token_rewards = None
    if p.policy.value_head is not None:
        batch.old_values = old_values(p.policy.model, p.policy.value_head, batch, p.objective, p.cfg.train.micro_batch_size)
    if a.kl.coef and a.kl.in_reward:
        assert batch.ref_logprobs is not None
        kl = algo.kl.kl_estimate(batch.behaviour_logprobs, batch.ref_logprobs, a.kl.estimator)  # (B, R)
        token_rewards = -a.kl.coef * kl * batch.mask
    fn = algo.get(algo.ADVANTAGES, a.advantage.name, "algo.advantage.name")
    out = fn(AdvantageInputs(rewards=batch.rewards, group_ids=batch.group_ids, mask=batch.mask,
                             onpolicy=batch.onpolicy_rows, values=batch.old_values, token_rewards=token_rewards),
             a.advantage)
    batch.advantages, batch.returns = out.advantages, out.returns


def train_step(p: Pieces, st: StepState) -> tuple[dict[str, float], list[Completion]]:
    """Sample, score, update: one step. -> (metrics, the step's completions)."""
    t0 = time.perf_counter()
    p.services.reward.reset()
    groups, extra = sample_groups(p, st)
    flat = [c for g in groups for c in g]
    t1 = time.perf_counter()
    batch = collate(flat, p.policy.renderer.pad_id, p.cfg.algo.mask_truncated).to(p.engine.device)
    if p.ref is not None:
        batch.ref_logprobs = reference_logprobs(p.ref, batch, p.objective, p.cfg.train.micro_batch_size)
    compute_advantages(p, batch)
    metrics, finite = update(p.policy.model, p.optim, p.objective, batch, algo=p.cfg.algo, train=p.cfg.train,
                             value_head=p.policy.value_head)
    _count_nonfinite(p, st, finite, flat)
    t2 = time.perf_counter()
    gen_tokens = sum(len(c.ids) for c in flat)
    st.generated_tokens += gen_tokens
    metrics |= step_metrics(groups, st, len(p.selector.samples)) | extra
    if p.guide is not None:
        metrics |= p.guide.metrics()
    reward_s = p.services.reward.seconds
    return metrics | {
        "time/generate": t1 - t0 - reward_s, "time/reward": reward_s, "time/update": t2 - t1, "time/step": t2 - t0,
        "perf/tokens_generated": float(gen_tokens), "perf/tokens_total": float(st.generated_tokens),
        "perf/tokens_per_s": gen_tokens / max(1e-9, t1 - t0),
    }, flat


def _count_nonfinite(p: Pieces, st: StepState, finite: bool, flat: list[Completion]) -> None:
    """A non-finite update is skipped; too many in a row stop the run with the samples named."""
    if finite:
        st.nonfinite_in_row = 0
        return
    st.nonfinite_in_row += 1
    ids = sorted({c.sample.id for c in flat})
    console.print(f"[yellow]step {st.step}: non-finite loss/gradient, update skipped (samples: {ids[:8]})")
    if st.nonfinite_in_row >= p.cfg.train.max_nonfinite:
        raise NonFiniteError(f"{st.nonfinite_in_row} non-finite updates in a row at step {st.step} "
                             f"(samples {ids[:8]}); lower train.lr or check rewards")


def step_metrics(groups: list[list[Completion]], st: StepState, n_train: int) -> dict[str, float]:
    """Rewards, response lengths and the guided shares of a step's completions."""
    flat = [c for g in groups for c in g]
    r = torch.tensor([c.reward for c in flat])
    lens = torch.tensor([float(len(c.ids)) for c in flat])
    guided = [c for c in flat if c.origin != "policy"]
    plain = [c for c in flat if c.origin == "policy"]
    st.solved |= {c.sample.id for c in plain if c.reward >= CORRECT}
    m = {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
        "reward/unguided": float(np.mean([c.reward for c in plain])) if plain else float("nan"),
        "reward/guided": float(np.mean([c.reward for c in guided])) if guided else float("nan"),
        "policy/len_mean": float(lens.mean()), "policy/len_max": float(lens.max()),
        "policy/truncated": float(np.mean([c.finish_reason == "length" for c in flat])),
        "guide/guided_share": len(guided) / len(flat),
        "guide/guided_token_share": float(sum(len(c.ids) for c in guided) / max(1.0, float(lens.sum()))),
        "guide/solved_share": len(st.solved) / max(1, n_train),
    }
    for k in {k for c in flat for k in c.reward_info if k.startswith("reward/")}:
        vals = [float(c.reward_info[k]) for c in flat if isinstance(c.reward_info.get(k), (int, float))]
        if vals:
            m[k] = float(np.mean(vals))
    return m
