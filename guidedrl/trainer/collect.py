"""Rollouts of a step: samples -> scored groups of completions. The trainer's side of the guidance
protocol: `PolicyServices` answers guidance's asks (one engine call, one reward call, one batched
log-prob pass per round), and `collect` runs the guide's programs around the plain sampling."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from guidedrl.core.types import Completion, Sample
from guidedrl.guidance.protocol import Guide, Plan, StepInfo, execute
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.nn.prompts import Renderer
from guidedrl.rollout.base import Engine, Generation, GenRequest
from guidedrl.trainer.batch import collate


class RewardTimer:
    """Wraps the reward call to time it separately from generation."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def __call__(self, samples: list[Sample], texts: list[str]) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(samples, texts)
        finally:
            self.seconds += time.perf_counter() - t0


def to_completion(sample: Sample, group: int, plan: Plan, gen: Generation, renderer: Renderer) -> Completion:
    """A Generation plus its plan's routing -> Completion (a forced prefix kept with loss mask 0)."""
    k = len(plan.prefix)
    return Completion(
        sample=sample, group=group, gen_context=plan.gen_context, ids=plan.prefix + gen.ids,
        behaviour_logprobs=[0.0] * k + gen.logprobs, text=renderer.decode(plan.prefix + gen.ids) if k else gen.text,
        finish_reason=gen.finish_reason, train_context=plan.train_context,
        loss_mask=[0.0] * k + [1.0] * len(gen.ids) if k else None, origin=plan.origin, offpolicy=plan.offpolicy,
        reward_info=dict(plan.meta),
    )


class PolicyServices:
    """Answers guidance's asks with the policy's engine, the run's reward and the policy itself."""

    def __init__(self, engine: Engine, renderer: Renderer, reward: RewardTimer, model: nn.Module,
                 temperature: float) -> None:
        self.engine = engine
        self.renderer = renderer
        self.reward = reward
        self.model = model
        self.temperature = temperature

    def generate(self, items: list[tuple[Sample, int, Plan]], seed: int) -> list[list[Completion]]:
        """Every item in one engine call; the completions come back scored."""
        outs = self.engine.generate([GenRequest(context=p.gen_context, n=p.n, prefix=p.prefix) for _, _, p in items],
                                    seed=seed)
        groups = [[to_completion(s, g, p, gen, self.renderer) for gen in gens]
                  for (s, g, p), gens in zip(items, outs, strict=True)]
        self.score([c for cs in groups for c in cs])
        return groups

    def score(self, completions: list[Completion]) -> None:
        """One reward call; reward and reward_info filled in place."""
        if not completions:
            return
        scores, infos = self.reward([c.sample for c in completions], [c.text for c in completions])
        for c, s, info in zip(completions, scores, infos, strict=True):
            c.reward = float(s)
            c.reward_info.update(info)

    @torch.no_grad()
    def logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The current policy's log-prob of each response token given its context, in one batch."""
        rows = [Completion(sample=Sample(id="_", prompt=""), group=i, gen_context=ctx, ids=ids,
                           behaviour_logprobs=[0.0] * len(ids), text="", finish_reason="eos")
                for i, (ctx, ids) in enumerate(pairs) if ids]
        out: list[list[float]] = [[] for _ in pairs]
        if not rows:
            return out
        batch = collate(rows, self.renderer.pad_id).to(next(self.model.parameters()).device)
        was = self.model.training
        self.model.eval()
        lp = policy_outputs(self.model, batch, temperature=self.temperature, share_prompts=False).logprobs  # (B, R)
        self.model.train(was)
        for row, c in zip(lp.float().cpu(), rows, strict=True):
            out[c.group] = row[: len(c.ids)].tolist()
        return out


def collect(samples: list[Sample], services: PolicyServices, guide: Guide | None, info: StepInfo, *,
            group_size: int, seed: int, group_offset: int = 0) -> list[list[Completion]]:
    """Samples -> scored groups of completions (one group per sample, in order; a guide may split
    or add groups). The plain samples of every group go to the engine in one call, and so does each
    round of the guide's asks."""
    plans = execute(guide.plan(samples, info), services, info.rng) if guide is not None else [None] * len(samples)
    items = [(s, group_offset + g, p) for g, (s, ps) in enumerate(zip(samples, plans, strict=True))
             for p in (ps or [Plan(gen_context=services.renderer.render(s), n=group_size)])]
    groups: list[list[Completion]] = [[] for _ in samples]
    for c in (c for cs in services.generate(items, seed) for c in cs):
        groups[c.group - group_offset].append(c)
    if guide is not None:
        groups = [g for g in execute(guide.revise(groups, info), services, info.rng) if g]
        for i, g in enumerate(groups):  # guides may split or add groups: renumber
            for c in g:
                c.group = group_offset + i
    return groups
