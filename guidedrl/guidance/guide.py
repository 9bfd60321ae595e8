"""ComposedGuide: one Guide built from a choice on each axis of GuidanceConfig.

Before sampling (`plan`), triggers that need no rewards (always, probability, offline hard set)
decide the contexts: a hint in the prompt or a teacher-forced reference prefix, for all, k or a
graded share of the G members. After scoring (`revise`), reward-based triggers (all-fail group,
best below a threshold) re-sample the group guided (with escalation), replace members with
guidance completions, add a refinement, let a guide model complete the policy's prefix, or attach
an expert sequence for the calibration term. Every completion it makes records its source, its
generation and training contexts, its loss mask and whether its tokens are off-policy.
"""

from __future__ import annotations

import random
from typing import Any

from guidedrl.guidance import inject
from guidedrl.core.config.guidance import GuidanceConfig
from guidedrl.guidance.pieces import fires, graded_share, schedule_strength
from guidedrl.rollout.collect import Plan, RolloutContext, generate_plans, score
from guidedrl.core.types import CORRECT, Completion, Sample

PRE = ("always", "probability", "offline_hard")
PRE_INJECTIONS = ("prompt_hint", "response_prefix")


class ComposedGuide:
    """Implements the Guide protocol (plan / revise / metrics / state) from a GuidanceConfig."""

    def __init__(self, cfg: GuidanceConfig, teachers: list[Any] | None = None) -> None:
        self.cfg = cfg
        self.teachers = teachers or []
        self.hard: dict[str, bool] = {}
        self._groups = 0
        self._triggered = 0

    # ------------------------------------------------------------------ protocol

    def active(self, step: int) -> GuidanceConfig:
        """The config in force at `step` (D2LOLS switches the injection at schedule.switch_step)."""
        c = self.cfg
        if c.after_switch is not None and c.schedule.kind == "phase" and step >= c.schedule.switch_step:
            return c.model_copy(update={"injection": c.after_switch})
        return c

    def _strength(self, ctx: RolloutContext) -> float:
        return schedule_strength(self.cfg.schedule, ctx.step, ctx.total_steps, self.cfg.after_switch is not None)

    def plan(self, sample: Sample, ctx: RolloutContext) -> list[Plan] | None:
        c = self.active(ctx.step)
        if c.trigger.kind not in PRE or c.injection not in PRE_INJECTIONS:
            return None
        self._groups += 1
        strength = self._strength(ctx)
        on = self._pre_fires(sample, ctx, strength)
        if not on:
            return None
        self._triggered += 1
        G = ctx.group_size
        plain = Plan(context=ctx.render(sample, None), n=1)
        if c.members == "graded":
            return [inject.guided_plan(c, sample, ctx, graded_share(i, G) * strength, ctx.rng, teachers=self.teachers) or plain
                    for i in range(G)]
        k = G if c.members == "all" else min(int(c.members), G)
        guided = inject.guided_plan(c, sample, ctx, strength, ctx.rng, teachers=self.teachers)
        if guided is None:
            return None
        plans = [_with_n(guided, k)] + ([_with_n(plain, G - k)] if G - k else [])
        if c.keep_unguided:
            plans.append(_with_n(plain, G))
        return plans

    def revise(self, groups: list[list[Completion]], ctx: RolloutContext) -> list[list[Completion]]:
        c = self.active(ctx.step)
        if c.injection == "none":
            return groups
        if c.trigger.kind in PRE and c.injection in PRE_INJECTIONS:
            return [part for g in groups for part in self._split_versions(g)] if c.keep_unguided else groups
        strength = self._strength(ctx)
        out: list[list[Completion]] = []
        for g in groups:
            self._groups += 1
            sample = g[0].sample
            pre = c.trigger.kind in PRE
            on = self._pre_fires(sample, ctx, strength) if pre else fires(c.trigger, g, ctx.rng, strength)
            if not on:
                out.append(g)
                continue
            self._triggered += 1
            new = inject.apply(c, g, ctx, self.teachers, strength)
            out.extend(new)
        return out

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

    # ------------------------------------------------------------------ helpers

    def _pre_fires(self, sample: Sample, ctx: RolloutContext, strength: float) -> bool:
        t = self.cfg.trigger
        if t.kind == "always":
            return strength > 0
        if t.kind == "probability":
            return ctx.rng.random() < t.p * strength
        if sample.id not in self.hard:
            self.hard[sample.id] = self._is_hard(sample, ctx)
        return self.hard[sample.id] and strength > 0

    def _is_hard(self, sample: Sample, ctx: RolloutContext) -> bool:
        """Offline hard set, decided the first time a prompt is seen: no correct answer in
        `hard_samples` unguided tries of the policy as it is then (POPE uses pass@k = 0 of the base)."""
        plan = Plan(context=ctx.render(sample, None), n=self.cfg.trigger.hard_samples)
        tries = generate_plans([(sample, 0, plan)], ctx, seed=ctx.rng.randrange(2**31))
        score(tries, ctx)
        return all(c.reward < CORRECT for c in tries)

    @staticmethod
    def _split_versions(group: list[Completion]) -> list[list[Completion]]:
        """POPE-style guided / unguided versions of one prompt get separate group statistics."""
        guided = [c for c in group if c.source != "policy"]
        plain = [c for c in group if c.source == "policy"]
        return [part for part in (guided, plain) if part]


def _with_n(p: Plan, n: int) -> Plan:
    return Plan(context=p.context, n=n, prefix=p.prefix, train_context=p.train_context,
                source=p.source, offpolicy=p.offpolicy, meta=dict(p.meta))


def seeded_rng(seed: int) -> random.Random:
    return random.Random(seed)
