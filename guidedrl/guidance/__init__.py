"""Guidance: hints, reference prefixes, teachers, critiques, composed along the axes of the
guidance config (source, trigger, injection, training context, off-policy weight, schedule).
Guidance is a pure layer the trainer drives through `guidance.protocol`."""

from __future__ import annotations

from guidedrl.core.config import Config, GuideCompletes
from guidedrl.guidance.guide import ComposedGuide
from guidedrl.guidance.protocol import Guide
from guidedrl.guidance.teacher import build_teachers
from guidedrl.nn.prompts import Renderer


def build_guide(cfg: Config, renderer: Renderer) -> Guide | None:
    """The guide a recipe asks for (its teachers loaded), or None for plain RL."""
    g = cfg.guidance
    if g is None:
        return None
    switch = g.switch if isinstance(g, GuideCompletes) else None
    return ComposedGuide(g, renderer, cfg.rollout.group_size, build_teachers(g.teachers, cfg.rollout),
                         build_teachers(switch.to.teachers, cfg.rollout) if switch is not None else [])
