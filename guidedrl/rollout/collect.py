"""Turn a step's Samples into scored Completions: plan contexts (guidance may add hints or forced
prefixes), generate, score, then let the guide revise triggered groups."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from guidedrl.rollout.base import Engine, Generation, GenRequest
from guidedrl.core.types import Completion, Sample, Source

RewardCall = Callable[[list[Sample], list[str]], tuple[list[float], list[dict[str, Any]]]]


@dataclass
class Plan:
    """How to produce `n` members of a group: generation context, forced prefix and token routing."""

    context: list[int]
    n: int
    prefix: list[int] = field(default_factory=list)
    """Teacher-forced response tokens (kept in the completion with loss mask 0 and log-prob 0)."""
    train_context: list[int] | None = None
    """Train under this context instead (guidance stripped); None = the generation context."""
    source: Source = "policy"
    offpolicy: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutContext:
    """What guides may use: the engine, prompt rendering, the reward, and where training stands."""

    engine: Engine
    tokenizer: Any
    render: Callable[[Sample, str | None], list[int]]
    """(sample, hint or None) -> context ids."""
    reward: RewardCall
    group_size: int
    step: int = 0
    total_steps: int = 1
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random)
    logprobs: Callable[[list[int], list[int]], list[float]] | None = None
    """(context ids, response ids) -> the current policy's log-prob of each response token."""

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class Guide(Protocol):
    """Guidance hooks. `plan` shapes contexts before sampling; `revise` acts on scored groups."""

    def plan(self, sample: Sample, ctx: RolloutContext) -> list[Plan] | None:
        """Plans for this sample's group, or None for G plain on-policy samples."""
        ...

    def revise(self, groups: list[list[Completion]], ctx: RolloutContext) -> list[list[Completion]]:
        """Return the groups to train on (may re-sample, inject or replace members)."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def to_completion(sample: Sample, group: int, plan: Plan, gen: Generation, tokenizer: Any) -> Completion:
    """A Generation plus its plan's routing -> Completion (forced prefix kept with mask 0)."""
    k = len(plan.prefix)
    text = gen.text if not k else tokenizer.decode(plan.prefix + gen.ids, skip_special_tokens=True)
    return Completion(
        sample=sample,
        group=group,
        prompt_ids=plan.context,
        ids=plan.prefix + gen.ids,
        logprobs=[0.0] * k + gen.logprobs,
        text=text,
        finish_reason=gen.finish_reason,
        train_prompt_ids=plan.train_context,
        loss_mask=[0.0] * k + [1.0] * len(gen.ids) if k else None,
        source=plan.source,
        offpolicy=plan.offpolicy,
        reward_info=dict(plan.meta),
    )


def generate_plans(
    items: list[tuple[Sample, int, Plan]], ctx: RolloutContext, seed: int
) -> list[Completion]:
    """Run every (sample, group, plan) through the engine in one batch call."""
    reqs = [GenRequest(context=p.context, n=p.n, prefix=p.prefix) for _, _, p in items]
    outs = ctx.engine.generate(reqs, seed=seed)
    return [to_completion(s, g, p, gen, ctx.tokenizer) for (s, g, p), gens in zip(items, outs, strict=True) for gen in gens]


def score(completions: list[Completion], ctx: RolloutContext) -> None:
    """Fill reward and reward_info in place."""
    if not completions:
        return
    scores, infos = ctx.reward([c.sample for c in completions], [c.text for c in completions])
    for c, s, info in zip(completions, scores, infos, strict=True):
        c.reward = float(s)
        c.reward_info.update(info)


def collect(samples: list[Sample], ctx: RolloutContext, guide: Guide | None, seed: int, group_offset: int = 0) -> list[list[Completion]]:
    """Samples -> scored groups of completions (one group per sample, in order)."""
    items: list[tuple[Sample, int, Plan]] = []
    for g, s in enumerate(samples):
        plans = guide.plan(s, ctx) if guide is not None else None
        for p in plans or [Plan(context=ctx.render(s, None), n=ctx.group_size)]:
            items.append((s, group_offset + g, p))
    flat = generate_plans(items, ctx, seed)
    score(flat, ctx)
    groups: list[list[Completion]] = [[] for _ in samples]
    for c in flat:
        groups[c.group - group_offset].append(c)
    if guide is not None:
        groups = [g for g in guide.revise(groups, ctx) if g]
        for i, g in enumerate(groups):  # guides may split or add groups: renumber
            for c in g:
                c.group = group_offset + i
    return groups
