"""ComposedGuide: one Guide built from a choice on each axis of the guidance config.

Before sampling (`plan`), triggers that need no rewards (always, probability, offline hard set)
decide the contexts: a hint in the prompt or a teacher-forced reference prefix, for all, k or a
graded share of the G members. After scoring (`revise`), reward-based triggers (all-fail group,
best below a threshold) re-sample the group guided (with escalation), replace members with
guidance completions, add a refinement, let a teacher complete the policy's prefix, or attach an
expert sequence for the calibration term. Every completion it makes records its origin, its
generation and training contexts, its loss mask and whether its tokens are off-policy.

Both hooks are programs over all groups of the step at once (`gather`), so their asks are batched.
"""

from __future__ import annotations

from typing import Any

from guidedrl.core.config import GuideCompletes, GuidanceConfig, PromptHint, ResponsePrefix
from guidedrl.core.types import CORRECT, Completion, Sample
from guidedrl.guidance import inject
from guidedrl.guidance.inject import Kit
from guidedrl.guidance.pieces import fires, graded_share, schedule_strength
from guidedrl.guidance.protocol import Generate, Plan, Program, StepInfo, Teacher, done, gather
from guidedrl.guidance.refine import refine
from guidedrl.nn.prompts import Renderer

INJECTIONS = {
    "prompt_hint": inject.resample, "response_prefix": inject.resample, "replace": inject.replace,
    "refine": refine, "guide_completes": inject.guide_completes, "auxiliary": inject.auxiliary,
}
"""The program of each injection, applied to a triggered group after scoring."""


class ComposedGuide:
    """Implements the Guide protocol (plan / revise / metrics / state) from a guidance config."""

    def __init__(self, cfg: GuidanceConfig, renderer: Renderer, group_size: int, teachers: list[Teacher] | None = None,
                 switch_teachers: list[Teacher] | None = None) -> None:
        self.cfg = cfg
        self.renderer = renderer
        self.group_size = group_size
        self.teachers = teachers or []
        self.switch_teachers = switch_teachers or []
        self.hard: dict[str, bool] = {}
        self._groups = 0
        self._triggered = 0

    def active(self, step: int) -> tuple[GuidanceConfig, list[Teacher]]:
        """The config in force at `step` and its teachers (D2LOLS switches the injection at switch.step)."""
        sw = self.cfg.switch if isinstance(self.cfg, GuideCompletes) else None
        if sw is not None and step >= sw.step:
            return sw.to, self.switch_teachers
        return self.cfg, self.teachers

    def plan(self, samples: list[Sample], info: StepInfo) -> Program[list[list[Plan] | None]]:
        c, teachers = self.active(info.step)
        if not (c.trigger.before_sampling and isinstance(c, (PromptHint, ResponsePrefix))):
            return [None] * len(samples)
        strength = schedule_strength(c.schedule, info.step, info.total_steps)
        on = yield from self._fires_before(c, samples, info, strength)
        self._groups += len(samples)
        self._triggered += sum(on)
        kit = Kit(self.renderer, teachers, info.rng)
        return (yield from gather([self._plan_one(c, s, kit, strength) if hit else done(None)
                                   for s, hit in zip(samples, on, strict=True)]))

    def _plan_one(self, c: PromptHint | ResponsePrefix, sample: Sample, kit: Kit, strength: float) -> Program[list[Plan] | None]:
        G = self.group_size
        plain = Plan(gen_context=self.renderer.render(sample), n=1)
        if c.members == "graded":
            shares = [graded_share(i, G) * strength for i in range(G)]
            plans = yield from gather([inject.guided_plan(c, sample, kit, s) for s in shares])
            return [p or plain for p in plans]
        k = G if c.members == "all" else min(int(c.members), G)
        guided = yield from inject.guided_plan(c, sample, kit, strength)
        if guided is None:
            return None
        plans = [guided.with_n(k)] + ([plain.with_n(G - k)] if G - k else [])
        if c.keep_unguided:
            plans.append(plain.with_n(G))
        return plans

    def revise(self, groups: list[list[Completion]], info: StepInfo) -> Program[list[list[Completion]]]:
        c, teachers = self.active(info.step)
        if c.injection == "none":
            return groups
        if c.trigger.before_sampling and isinstance(c, (PromptHint, ResponsePrefix)):  # planned before sampling
            return [part for g in groups for part in _split_versions(g)] if c.keep_unguided else groups
        strength = schedule_strength(c.schedule, info.step, info.total_steps)
        if c.trigger.before_sampling:
            on = yield from self._fires_before(c, [g[0].sample for g in groups], info, strength)
        else:
            on = [fires(c.trigger, g, info.rng, strength) for g in groups]
        self._groups += len(groups)
        self._triggered += sum(on)
        kit = Kit(self.renderer, teachers, info.rng)
        apply = INJECTIONS[c.injection]
        outs = yield from gather([apply(c, g, kit, strength) if hit else done([g])  # type: ignore[arg-type]
                                  for g, hit in zip(groups, on, strict=True)])
        return [part for out in outs for part in out]

    def metrics(self) -> dict[str, float]:
        rate = self._triggered / self._groups if self._groups else 0.0
        self._groups = self._triggered = 0
        m = {"guide/trigger_rate": rate}
        if self.cfg.trigger.kind == "offline_hard" and self.hard:
            m["guide/hard_share"] = sum(self.hard.values()) / len(self.hard)
        return m

    def state_dict(self) -> dict[str, Any]:
        return {"hard": dict(self.hard)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hard = dict(state.get("hard", {}))

    def _fires_before(self, c: GuidanceConfig, samples: list[Sample], info: StepInfo, strength: float) -> Program[list[bool]]:
        """Triggers decided without the group's rewards. The offline hard set is decided the first
        time a prompt is seen: no correct answer in `hard_samples` unguided tries of the policy as it
        is then (POPE uses pass@k = 0 of the base); new prompts of a step are tried in one batch."""
        t = c.trigger
        if t.kind == "always":
            return [strength > 0] * len(samples)
        if t.kind == "probability":
            return [info.rng.random() < t.p * strength for _ in samples]
        new = list({s.id: s for s in samples if s.id not in self.hard}.values())
        if new:
            tries = yield Generate([(s, 0, Plan(gen_context=self.renderer.render(s), n=t.hard_samples)) for s in new])
            for s, got in zip(new, tries, strict=True):
                self.hard[s.id] = all(x.reward < CORRECT for x in got)
        return [self.hard[s.id] and strength > 0 for s in samples]


def _split_versions(group: list[Completion]) -> list[list[Completion]]:
    """POPE-style guided / unguided versions of one prompt get separate group statistics."""
    guided = [x for x in group if x.origin != "policy"]
    plain = [x for x in group if x.origin == "policy"]
    return [part for part in (guided, plain) if part]
