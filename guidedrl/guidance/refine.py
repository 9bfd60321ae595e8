"""Critique-then-refine inside a group: Critique-GRPO (rule-based `simple_gt` critique, the best
refinement joins the group under the original prompt), HeRL (revise the best failed attempt against
unmet criteria, reward bonus for improvable attempts) and R3L (retry from the pivot step, tokens
before the pivot masked)."""

from __future__ import annotations

from guidedrl.core.config import Refine
from guidedrl.core.types import CORRECT, Completion, Sample
from guidedrl.guidance.inject import Kit
from guidedrl.guidance.pieces import critique_text, rubric_items
from guidedrl.guidance.protocol import Generate, Plan, Program

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


def feedback_for(c: Refine, sample: Sample, attempt: Completion) -> str:
    if c.source == "rubric":
        return "Unmet criteria: " + "; ".join(rubric_items(sample)) if rubric_items(sample) else critique_text(sample, attempt)
    return critique_text(sample, attempt)


def _candidates(c: Refine, group: list[Completion]) -> list[Completion]:
    failed = [x for x in group if x.reward < CORRECT]
    if c.source == "rubric":  # HeRL: the top-scoring failed responses
        best = max((x.reward for x in failed), default=0.0)
        return [x for x in failed if x.reward == best][:16]
    return failed


def _retry_plan(c: Refine, attempt: Completion, kit: Kit) -> tuple[Plan, int]:
    sample = attempt.sample
    fb = feedback_for(c, sample, attempt)
    prompt = c.template.format(prompt=sample.prompt, attempt=attempt.text, feedback=fb)
    context = kit.renderer.render(Sample(id=sample.id, prompt=prompt))
    plain = kit.renderer.render(sample)
    pivot_tokens = 0
    prefix: list[int] = []
    if c.pivot_mask:
        pc = pivot_chars(attempt.text, sample.reference)
        prefix = kit.renderer.encode(attempt.text[:pc]) if pc else []
        pivot_tokens = len(prefix)
        context = kit.renderer.render(sample, fb)  # retry from the pivot with the feedback in the context
    train = plain if c.context == "strip" else None
    return Plan(gen_context=context, n=1, prefix=prefix, train_context=train, origin="guided", offpolicy=c.offpolicy,
                meta={"feedback": fb}), pivot_tokens


def _mask_before_pivot(x: Completion, k: int) -> None:
    m = list(x.mask)
    x.loss_mask = [0.0] * min(k, len(m)) + m[k:]


def refine(c: Refine, group: list[Completion], kit: Kit, strength: float) -> Program[list[list[Completion]]]:
    """One revision per candidate attempt; the best revision (first correct, else highest) joins."""
    cands = _candidates(c, group)
    if not cands:
        return [group]
    plans = [_retry_plan(c, a, kit) for a in cands]
    answer = yield Generate([(a.sample, a.group, p) for a, (p, _) in zip(cands, plans, strict=True)])
    revs = [got[0] for got in answer]  # one revision per candidate
    i = next((j for j, r in enumerate(revs) if r.reward >= CORRECT), max(range(len(revs)), key=lambda j: revs[j].reward))
    best, attempt, pivot = revs[i], cands[i], plans[i][1]
    if c.bonus:
        bonus = c.bonus * (best.reward - attempt.reward)
        attempt.reward += bonus
        attempt.reward_info["reward/refine_bonus"] = bonus
    if c.pivot_mask and pivot:
        _mask_before_pivot(attempt, pivot)
    if c.behaviour == "one":
        best.behaviour_logprobs = [0.0] * len(best.ids)
    if c.place == "append":
        return [group + [best]]
    out = list(group)
    out[group.index(attempt)] = best
    if c.pivot_mask:  # R3L keeps the original attempt too (its pre-pivot tokens masked)
        out.append(attempt)
    return [out]
