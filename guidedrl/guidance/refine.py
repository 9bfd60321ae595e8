"""Critique-then-refine inside a group: Critique-GRPO (rule-based `simple_gt` critique, the best
refinement joins the group under the original prompt), HeRL (revise the best failed attempt against
unmet criteria, reward bonus for improvable attempts) and R3L (retry from the pivot step, tokens
before the pivot masked)."""

from __future__ import annotations

from guidedrl.core.config.guidance import GuidanceConfig
from guidedrl.guidance.pieces import critique_text, rubric_items
from guidedrl.rollout.collect import Plan, RolloutContext, generate_plans, score
from guidedrl.core.types import CORRECT, Completion, Sample

STEP_ENDS = (".", "\n", ";")


def pivot_chars(attempt: str, reference: str | None) -> int:
    """Where the attempt first leaves the reference, cut back to the last step boundary (R3L's
    `retry_from_step`, computed by a rule instead of the policy's own JSON reflection)."""
    if not reference:
        return 0
    n = 0
    for a, b in zip(attempt, reference):
        if a != b:
            break
        n += 1
    cut = max((attempt.rfind(e, 0, n) for e in STEP_ENDS), default=-1)
    return cut + 1 if cut >= 0 else 0


def feedback_for(cfg: GuidanceConfig, sample: Sample, attempt: Completion) -> str:
    if cfg.source == "rubric":
        return "Unmet criteria: " + "; ".join(rubric_items(sample)) if rubric_items(sample) else critique_text(sample, attempt)
    return critique_text(sample, attempt)


def _candidates(cfg: GuidanceConfig, group: list[Completion]) -> list[Completion]:
    failed = [c for c in group if c.reward < CORRECT]
    if cfg.source == "rubric":  # HeRL: the top-scoring failed responses
        best = max((c.reward for c in failed), default=0.0)
        return [c for c in failed if c.reward == best][:16]
    return failed


def _retry_plan(cfg: GuidanceConfig, attempt: Completion, ctx: RolloutContext) -> tuple[Plan, int]:
    sample = attempt.sample
    fb = feedback_for(cfg, sample, attempt)
    prompt = cfg.refine_template.format(prompt=sample.prompt, attempt=attempt.text, feedback=fb)
    context = ctx.render(Sample(id=sample.id, prompt=prompt), None)
    plain = ctx.render(sample, None)
    pivot_tokens = 0
    prefix: list[int] = []
    if cfg.pivot_mask:
        pc = pivot_chars(attempt.text, sample.reference)
        prefix = ctx.encode(attempt.text[:pc]) if pc else []
        pivot_tokens = len(prefix)
        context = ctx.render(sample, fb)  # retry from the pivot with the guidance in the context
    train = plain if cfg.context == "strip" else None
    return Plan(context=context, n=1, prefix=prefix, train_context=train, source="guided", offpolicy=cfg.offpolicy,
                meta={"feedback": fb}), pivot_tokens


def _mask_before_pivot(c: Completion, k: int) -> None:
    m = list(c.mask)
    c.loss_mask = [0.0] * min(k, len(m)) + m[k:]


def refine_group(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext) -> list[list[Completion]]:
    """One revision per candidate attempt; the best revision (first correct, else highest) joins."""
    cands = _candidates(cfg, group)
    if not cands:
        return [group]
    plans = [_retry_plan(cfg, a, ctx) for a in cands]
    items = [(a.sample, a.group, p) for a, (p, _) in zip(cands, plans)]
    revs = generate_plans(items, ctx, seed=ctx.rng.randrange(2**31))
    score(revs, ctx)
    i = next((j for j, r in enumerate(revs) if r.reward >= CORRECT), max(range(len(revs)), key=lambda j: revs[j].reward))
    best, attempt, pivot = revs[i], cands[i], plans[i][1]
    if cfg.refine_bonus:
        bonus = cfg.refine_bonus * (best.reward - attempt.reward)
        attempt.reward += bonus
        attempt.reward_info["reward/refine_bonus"] = bonus
    if cfg.pivot_mask and pivot:
        _mask_before_pivot(attempt, pivot)
    if cfg.behaviour == "one":
        best.logprobs = [0.0] * len(best.ids)
    if cfg.place == "append":
        return [group + [best]]
    out = list(group)
    out[group.index(attempt)] = best
    if cfg.pivot_mask:  # R3L keeps the original attempt too (its pre-pivot tokens masked)
        out.append(attempt)
    return [out]
