"""The small pure pieces guidance is made of: how much to show (schedules, graded shares,
escalation), what to show (sources), and when (triggers)."""

from __future__ import annotations

import math
import random
from typing import Any

from guidedrl.core.config.guidance import Prefix, Schedule, Trigger
from guidedrl.core.types import CORRECT, Completion, Sample


def schedule_strength(s: Schedule, step: int, total_steps: int) -> float:
    """Guidance strength in [0, 1] at `step`.

    sigmoid_decay (RuscaRL): 1 / (1 + exp((x - midpoint) * steepness)), x = step / (total - 1).
    linear_decay: 1 - x. phase: 1 before `switch_step`, 0 from it on. fixed: 1.
    """
    x = step / max(1, total_steps - 1)
    if s.kind == "fixed":
        return 1.0
    if s.kind == "linear_decay":
        return max(0.0, 1.0 - x)
    if s.kind == "phase":
        return 1.0 if step < s.switch_step else 0.0
    z = (x - s.midpoint) * s.steepness
    return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))


def graded_share(i: int, n: int) -> float:
    """RuscaRL's intra-group gradient: member i of n gets (n-1-i)/(n-1) of the scaffold (1, ..., 0)."""
    return 1.0 if n <= 1 else (n - 1 - i) / (n - 1)


def prefix_fractions(p: Prefix, rng: random.Random) -> list[float]:
    """The fractions to try, in order: the escalation ladder, one random draw, or the fixed one."""
    if p.escalate:
        return list(p.escalate)
    if p.random_range is not None:
        lo, hi = p.random_range
        return [rng.uniform(lo, hi)]
    return [p.fraction]


def cut(text: str, fraction: float, tokenizer: Any, unit: str) -> str:
    """The first `fraction` of `text`, counted in characters or tokens (rounded, at least 1 unit)."""
    if fraction <= 0 or not text:
        return ""
    if unit == "chars":
        return text[: max(1, round(len(text) * fraction))]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: max(1, round(len(ids) * fraction))])


def hint_text(sample: Sample, share: float) -> str | None:
    """The first round(len(hints) * share) hints joined (weakest first), or None."""
    k = round(len(sample.hints) * share)
    return "\n".join(sample.hints[:k]) if k > 0 else None


def knowledge_text(sample: Sample) -> str | None:
    """KnowRL: the sample's knowledge points as a `## Hint` section (extra['knowledge'], else hints)."""
    kps = sample.extra.get("knowledge") or sample.hints
    return "## Hint\n" + "\n".join(f"- {k}" for k in kps) if kps else None


def rubric_items(sample: Sample) -> list[str]:
    """Rubric criteria (extra['rubric']), falling back to the hints as the scaffold."""
    rub = sample.extra.get("rubric")
    return [str(r) for r in rub] if rub else list(sample.hints)


def critique_text(sample: Sample, completion: Completion) -> str:
    """Critique-GRPO's rule-based `simple_gt` critique from the ground truth."""
    verdict = "correct" if completion.reward >= CORRECT else "incorrect"
    gt = f" The ground truth is {sample.answer}." if sample.answer is not None else ""
    return f"The generated solution is {verdict}.{gt}"


def fires(t: Trigger, group: list[Completion], rng: random.Random, strength: float = 1.0) -> bool:
    """Whether this (scored) group gets guidance. `offline_hard` is decided by the guide's pre-pass."""
    if t.kind == "always":
        return strength > 0
    if t.kind == "probability":
        return rng.random() < t.p * strength
    best = max((c.reward for c in group), default=0.0)
    if t.kind == "all_fail":
        return best < CORRECT
    if t.kind == "below_threshold":
        return best < t.threshold
    raise ValueError(f"trigger {t.kind} is decided before sampling")
