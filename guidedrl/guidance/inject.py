"""Injection modes: how guidance enters a group (see guide.py for when)."""

from __future__ import annotations

import random
from typing import Any

from guidedrl.core.config.guidance import GuidanceConfig
from guidedrl.guidance.pieces import (
    critique_text, cut, hint_text, knowledge_text, prefix_fractions, rubric_items,
)
from guidedrl.rollout.collect import Plan, RolloutContext, generate_plans, score
from guidedrl.core.types import CORRECT, Completion, Sample


def source_text(cfg: GuidanceConfig, sample: Sample, ctx: RolloutContext, share: float, fraction: float,
                teachers: list[Any]) -> str | None:
    """The guidance text for `sample` at strength `share` and prefix `fraction` (None = nothing to show)."""
    tok, unit = ctx.tokenizer, cfg.prefix.unit
    if share <= 0:
        return None
    if cfg.source == "reference":
        return cut(sample.reference or "", fraction * share, tok, unit) or None
    if cfg.source == "hint":
        return hint_text(sample, share)
    if cfg.source == "knowledge":
        return knowledge_text(sample)
    if cfg.source == "rubric":
        items = rubric_items(sample)
        k = round(len(items) * share)
        return "\n".join(items[:k]) if k else None
    if cfg.source == "teacher" and teachers:
        trace = teachers[0].complete(sample, n=1, seed=ctx.rng.randrange(2**31))[0]
        return cut(trace, fraction * share, tok, unit) or None
    return None


def guided_plan(cfg: GuidanceConfig, sample: Sample, ctx: RolloutContext, share: float, rng: random.Random,
                fraction: float | None = None, teachers: list[Any] | None = None) -> Plan | None:
    """A Plan that samples under guidance (prompt hint or teacher-forced prefix), or None."""
    frac = prefix_fractions(cfg.prefix, rng)[0] if fraction is None else fraction
    text = source_text(cfg, sample, ctx, share, frac, teachers or [])
    if text is None:
        return None
    plain = ctx.render(sample, None)
    meta = {"guidance": text, "guide_share": share, "guide_fraction": frac}
    if cfg.injection == "response_prefix":
        return Plan(context=plain, n=1, prefix=ctx.encode(text), source="guided", offpolicy=cfg.offpolicy, meta=meta)
    context = ctx.render(sample, cfg.hint_template.format(hint=text))
    train = plain if cfg.context == "strip" else None
    return Plan(context=context, n=1, train_context=train, source="guided", offpolicy=cfg.offpolicy, meta=meta)


def _slots(group: list[Completion], k: int, rng: random.Random) -> list[int]:
    """Indices of k members to replace: failed ones first, in random order."""
    failed = [i for i, c in enumerate(group) if c.reward < CORRECT]
    others = [i for i, c in enumerate(group) if c.reward >= CORRECT]
    rng.shuffle(failed)
    rng.shuffle(others)
    return (failed + others)[:k]


def _place(cfg: GuidanceConfig, group: list[Completion], new: list[Completion], rng: random.Random) -> list[Completion]:
    if cfg.place == "append":
        return group + new
    out = list(group)
    for slot, c in zip(_slots(group, len(new), rng), new):
        out[slot] = c
    return out


def _set_behaviour(cfg: GuidanceConfig, cs: list[Completion]) -> None:
    """Behaviour probability one => the off-policy weight uses p itself (LUFFY / Critique-GRPO)."""
    if cfg.behaviour == "one":
        for c in cs:
            c.logprobs = [0.0] * len(c.ids)


def resample(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, strength: float,
             teachers: list[Any]) -> list[list[Completion]]:
    """Re-sample the group (or k members) with guidance, escalating the prefix while all fail (GHPO)."""
    sample, G = group[0].sample, len(group)
    k = G if cfg.members in ("all", "graded") else min(int(cfg.members), G)
    best = group
    for frac in prefix_fractions(cfg.prefix, ctx.rng):
        plan = guided_plan(cfg, sample, ctx, strength, ctx.rng, fraction=frac, teachers=teachers)
        if plan is None:
            break
        plan.n = k
        new = generate_plans([(sample, group[0].group, plan)], ctx, seed=ctx.rng.randrange(2**31))
        score(new, ctx)
        _set_behaviour(cfg, new)
        best = new if k == G else _place(cfg, group, new, ctx.rng)
        if any(c.reward >= CORRECT for c in new):
            break
    return [best, group] if cfg.keep_unguided and best is not group else [best]


def text_completion(sample: Sample, group: int, context: list[int], text: str, ctx: RolloutContext,
                    source: str, cfg: GuidanceConfig) -> Completion:
    """A guidance text (reference solution, teacher trace) as a trained, off-policy completion."""
    eos = ctx.tokenizer.eos_token_id
    ids = ctx.encode(text) + ([eos] if eos is not None else [])
    return Completion(sample=sample, group=group, prompt_ids=context, ids=ids, logprobs=[0.0] * len(ids),
                      text=text, finish_reason="eos", source=source, offpolicy=cfg.offpolicy, sft=True,  # type: ignore[arg-type]
                      reward_info={"guidance": "full"})


def replace(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, teachers: list[Any]) -> list[list[Completion]]:
    """Put k guidance completions (reference solution or the best-understood teacher traces) in the group."""
    from guidedrl.guidance.teacher import rank_traces

    sample, G = group[0].sample, len(group)
    k = 1 if cfg.members in ("all", "graded") else min(int(cfg.members), G)
    context = ctx.render(sample, None)
    if cfg.source == "teacher":
        traces = [t.complete(sample, n=1, seed=ctx.rng.randrange(2**31))[0] for t in teachers]
        texts = rank_traces(traces, sample, context, ctx)[:k]
        src = "teacher"
    else:
        texts = [sample.reference] * k if sample.reference else []
        src = "reference"
    new = [text_completion(sample, group[0].group, context, t, ctx, src, cfg) for t in texts]
    score(new, ctx)
    return [_place(cfg, group, new, ctx.rng)]


def refine(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, teachers: list[Any]) -> list[list[Completion]]:
    """Critique-then-refine (Critique-GRPO, HeRL, R3L): the policy revises failed attempts given
    feedback; the best revision joins the group under the original prompt."""
    from guidedrl.guidance.refine import refine_group

    return refine_group(cfg, group, ctx)


def guide_completes(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, teachers: list[Any]) -> list[list[Completion]]:
    """AggreVaTeD roll-out: the guide finishes each member from a random point of the policy's
    roll-in; only the policy's roll-in tokens are trained."""
    teacher = teachers[0]
    out = []
    for c in group:
        t = ctx.rng.randint(1, max(1, len(c.ids) - 1)) if len(c.ids) > 1 else len(c.ids)
        rollin = ctx.tokenizer.decode(c.ids[:t], skip_special_tokens=True)
        tail = teacher.complete(c.sample, n=1, seed=ctx.rng.randrange(2**31), prefix=rollin)[0]
        tail_ids = ctx.encode(tail) + [ctx.tokenizer.eos_token_id]
        out.append(Completion(
            sample=c.sample, group=c.group, prompt_ids=c.prompt_ids, ids=c.ids[:t] + tail_ids,
            logprobs=c.logprobs[:t] + [0.0] * len(tail_ids), text=rollin + tail, finish_reason="eos",
            loss_mask=[1.0] * t + [0.0] * len(tail_ids), source="guided", reward_info={"rollin_len": t},
        ))
    score(out, ctx)
    return [out]


def auxiliary(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, teachers: list[Any]) -> list[list[Completion]]:
    """CalibRL: the expert (reference) sequence's log-probs under the policy at rollout time, aligned
    by position with each member, for the calibration term; the expert itself is not trained."""
    sample = group[0].sample
    if not sample.reference or ctx.logprobs is None:
        return [group]
    eos = ctx.tokenizer.eos_token_id
    expert = ctx.encode(sample.reference) + ([eos] if eos is not None else [])
    lps = ctx.logprobs(ctx.render(sample, None), expert)
    for c in group:
        n = len(c.ids)
        c.token_extras["expert_logprobs"] = (lps + [0.0] * n)[:n]
        c.token_extras["expert_mask"] = ([1.0] * len(lps) + [0.0] * n)[:n]
    return [group]


INJECTIONS = {
    "prompt_hint": resample, "response_prefix": resample, "replace": replace, "refine": refine,
    "guide_completes": guide_completes, "auxiliary": auxiliary,
}


def apply(cfg: GuidanceConfig, group: list[Completion], ctx: RolloutContext, teachers: list[Any], strength: float) -> list[list[Completion]]:
    """Apply the configured injection to a triggered group."""
    if cfg.injection in ("prompt_hint", "response_prefix"):
        return resample(cfg, group, ctx, strength, teachers)
    return INJECTIONS[cfg.injection](cfg, group, ctx, teachers)
