"""Injections: how guidance enters a triggered group (see guide.py for when). Each is a program
(`guidance.protocol`): it yields asks (generate, score, log-probs, teacher text) and returns the
groups to train on; the trainer batches one round of every group's asks into one call."""

from __future__ import annotations

import random
from dataclasses import dataclass

from guidedrl.core.config import GuidanceConfig, PromptHint, ResponsePrefix
from guidedrl.core.types import CORRECT, Completion, Origin, Sample
from guidedrl.guidance.pieces import cut, hint_text, knowledge_text, prefix_fractions, rubric_items
from guidedrl.guidance.protocol import Asks, Generate, LogProbs, Plan, Program, Score, Teacher, TeacherText
from guidedrl.guidance.teacher import rank_traces
from guidedrl.nn.prompts import Renderer


@dataclass(frozen=True)
class Kit:
    """What an injection works with in one step: prompt rendering, the teachers, the step's rng."""

    renderer: Renderer
    teachers: list[Teacher]
    rng: random.Random


def source_text(c: PromptHint | ResponsePrefix, sample: Sample, kit: Kit, share: float, fraction: float) -> Program[str | None]:
    """The guidance text for `sample` at strength `share` and prefix `fraction` (None = nothing to show)."""
    tok, unit = kit.renderer.tokenizer, c.prefix.unit
    if share <= 0:
        return None
    if c.source == "reference":
        return cut(sample.reference or "", fraction * share, tok, unit) or None
    if c.source == "hint":
        return hint_text(sample, share)
    if c.source == "knowledge":
        return knowledge_text(sample)
    if c.source == "rubric":
        items = rubric_items(sample)
        k = round(len(items) * share)
        return "\n".join(items[:k]) if k else None
    (trace,), = yield TeacherText(kit.teachers[0], [(sample, "", 1)])
    return cut(trace, fraction * share, tok, unit) or None


def guided_plan(c: PromptHint | ResponsePrefix, sample: Sample, kit: Kit, share: float,
                fraction: float | None = None) -> Program[Plan | None]:
    """A Plan that samples under guidance (prompt hint or teacher-forced prefix), or None."""
    frac = prefix_fractions(c.prefix, kit.rng)[0] if fraction is None else fraction
    text = yield from source_text(c, sample, kit, share, frac)
    if text is None:
        return None
    plain = kit.renderer.render(sample)
    meta = {"guidance": text, "guide_share": share, "guide_fraction": frac}
    if isinstance(c, ResponsePrefix):
        return Plan(gen_context=plain, n=1, prefix=kit.renderer.encode(text), origin="guided", meta=meta)
    context = kit.renderer.render(sample, c.template.format(guidance=text))
    train = plain if c.context == "strip" else None
    return Plan(gen_context=context, n=1, train_context=train, origin="guided", offpolicy=c.offpolicy, meta=meta)


def slots(group: list[Completion], k: int, rng: random.Random) -> list[int]:
    """Indices of k members to replace: failed ones first, in random order."""
    failed = [i for i, c in enumerate(group) if c.reward < CORRECT]
    others = [i for i, c in enumerate(group) if c.reward >= CORRECT]
    rng.shuffle(failed)
    rng.shuffle(others)
    return (failed + others)[:k]


def place(group: list[Completion], new: list[Completion], where: str, rng: random.Random) -> list[Completion]:
    """`new` appended to the group, or put in the slots of k members (failed ones first)."""
    if where == "append":
        return group + new
    out = list(group)
    for slot, c in zip(slots(group, len(new), rng), new):
        out[slot] = c
    return out


def resample(c: PromptHint | ResponsePrefix, group: list[Completion], kit: Kit, strength: float) -> Program[list[list[Completion]]]:
    """Re-sample the group (or k members) with guidance, escalating the prefix while all fail (GHPO)."""
    sample, G = group[0].sample, len(group)
    k = G if c.members in ("all", "graded") else min(int(c.members), G)
    best = group
    for frac in prefix_fractions(c.prefix, kit.rng):
        plan = yield from guided_plan(c, sample, kit, strength, fraction=frac)
        if plan is None:
            break
        (new,) = yield Generate([(sample, group[0].group, plan.with_n(k))])
        if isinstance(c, PromptHint) and c.behaviour == "one":
            for x in new:  # behaviour probability one: the off-policy weight uses p itself
                x.behaviour_logprobs = [0.0] * len(x.ids)
        best = new if k == G else place(group, new, "replace", kit.rng)
        if any(x.reward >= CORRECT for x in new):
            break
    return [best, group] if c.keep_unguided and best is not group else [best]


def text_completion(sample: Sample, group: int, context: list[int], text: str, kit: Kit, origin: Origin,
                    offpolicy: bool) -> Completion:
    """A guidance text (reference solution, teacher trace) as a trained completion (behaviour
    probability one: no model sampled it) that the cross-entropy term may imitate."""
    eos = kit.renderer.eos_id
    ids = kit.renderer.encode(text) + ([eos] if eos is not None else [])
    return Completion(sample=sample, group=group, gen_context=context, ids=ids, behaviour_logprobs=[0.0] * len(ids),
                      text=text, finish_reason="eos", origin=origin, offpolicy=offpolicy, sft=True,
                      reward_info={"guidance": "full"})


def replace(c: GuidanceConfig, group: list[Completion], kit: Kit, strength: float) -> Program[list[list[Completion]]]:
    """Put `count` guidance completions (the reference solution, or the best-understood teacher
    traces) into the group."""
    sample = group[0].sample
    context = kit.renderer.render(sample)
    if c.source == "teacher":
        texts = yield from _teacher_traces(sample, context, kit)
        texts, origin = texts[: c.count], "teacher"
    else:
        texts, origin = ([sample.reference] * c.count if sample.reference else []), "reference"
    new = [text_completion(sample, group[0].group, context, t, kit, origin, c.offpolicy) for t in texts]  # type: ignore[arg-type]
    if new:
        yield Score(new)
    return [place(group, new, c.place, kit.rng)]


def _teacher_traces(sample: Sample, context: list[int], kit: Kit) -> Program[list[str]]:
    """One trace from each teacher, best-comprehended first."""
    answers = yield Asks([TeacherText(t, [(sample, "", 1)]) for t in kit.teachers])
    traces = [texts[0][0] for texts in answers]
    return (yield from rank_traces(traces, sample, context, kit.renderer))


def guide_completes(c: GuidanceConfig, group: list[Completion], kit: Kit, strength: float) -> Program[list[list[Completion]]]:
    """AggreVaTeD roll-out: the teacher finishes each member from a random point of the policy's
    roll-in; only the policy's roll-in tokens are trained."""
    cuts = [kit.rng.randint(1, max(1, len(x.ids) - 1)) if len(x.ids) > 1 else len(x.ids) for x in group]
    rollins = [kit.renderer.decode(x.ids[:t]) for x, t in zip(group, cuts, strict=True)]
    tails = yield TeacherText(kit.teachers[0], [(x.sample, r, 1) for x, r in zip(group, rollins, strict=True)])
    out = []
    eos = kit.renderer.eos_id
    for x, t, rollin, (tail,) in zip(group, cuts, rollins, tails, strict=True):
        tail_ids = kit.renderer.encode(tail) + ([eos] if eos is not None else [])
        out.append(Completion(
            sample=x.sample, group=x.group, gen_context=x.gen_context, ids=x.ids[:t] + tail_ids,
            behaviour_logprobs=x.behaviour_logprobs[:t] + [0.0] * len(tail_ids), text=rollin + tail,
            finish_reason="eos", loss_mask=[1.0] * t + [0.0] * len(tail_ids), origin="guided",
            reward_info={"rollin_len": t},
        ))
    yield Score(out)
    return [out]


def auxiliary(c: GuidanceConfig, group: list[Completion], kit: Kit, strength: float) -> Program[list[list[Completion]]]:
    """CalibRL: the expert (reference) sequence's log-probs under the policy at rollout time, aligned
    by position with each member, for the calibration term; the expert itself is not trained."""
    sample = group[0].sample
    if not sample.reference:
        return [group]
    eos = kit.renderer.eos_id
    expert = kit.renderer.encode(sample.reference) + ([eos] if eos is not None else [])
    (lps,) = yield LogProbs([(kit.renderer.render(sample), expert)])
    for x in group:
        n = len(x.ids)
        x.expert_logprobs = (lps + [0.0] * n)[:n]
        x.expert_len = min(len(lps), n)
    return [group]
