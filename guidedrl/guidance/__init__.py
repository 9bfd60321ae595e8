"""Guidance: hints, reference prefixes, teachers, critiques — composed along the axes of
GuidanceConfig (source, trigger, injection, training context, off-policy weight, schedule)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guidedrl.core.config import Config
    from guidedrl.rollout.collect import Guide


def build_guide(cfg: "Config") -> "Guide | None":
    """The guide a recipe asks for, or None for plain RL."""
    if cfg.guidance is None:
        return None
    from guidedrl.guidance.guide import ComposedGuide
    from guidedrl.guidance.teacher import build_teachers

    g = cfg.guidance
    teachers = build_teachers(([g.teacher] if g.teacher else []) + list(g.teachers), cfg.rollout)
    return ComposedGuide(g, teachers)
