"""Guidance config: one choice per axis (source, trigger, injection, context, weight, schedule)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from guidedrl.core.config.base import Strict


class Trigger(Strict):
    """When a group gets guidance."""

    kind: Literal["always", "probability", "all_fail", "below_threshold", "offline_hard"] = "all_fail"
    """always | probability (p) | all_fail (no member correct) | below_threshold (best < threshold) |
    offline_hard (prompts the starting policy never solved in a pre-pass of `hard_samples` tries)."""
    p: float = Field(0.5, ge=0, le=1)
    threshold: float = 1.0
    hard_samples: int = 8


class Prefix(Strict):
    """How much of the guidance text is shown (reference prefixes, hints as solution beginnings)."""

    fraction: float = Field(0.5, ge=0, le=1)
    escalate: list[float] | None = None
    """Try these fractions in turn while the group still fails (GHPO: [0.25, 0.5, 0.75])."""
    random_range: tuple[float, float] | None = None
    """Draw the fraction uniformly from this range per sample (PrefixRL's several h; RLGF's uniform t)."""
    unit: Literal["chars", "tokens"] = "tokens"


class Schedule(Strict):
    """How guidance strength changes over training (multiplies the amount / probability)."""

    kind: Literal["fixed", "sigmoid_decay", "linear_decay", "phase"] = "fixed"
    midpoint: float = 0.2
    """sigmoid_decay: 1/(1+exp((x - midpoint) * steepness)) with x = training progress in [0, 1] (RuscaRL)."""
    steepness: float = 125.0
    switch_step: int = 0
    """phase: guidance injection `before` until this step, `after` from it on (D2LOLS tau)."""


class Teacher(Strict):
    """A guide / teacher / critic model: a local model or an OpenAI-compatible endpoint."""

    path: str | None = "builtin:arith-teacher"
    """Local model like model.path; ignored when `url` is set."""
    url: str | None = None
    """OpenAI-compatible base URL (vLLM serve, SGLang, a hosted API); text only, no log-probs."""
    model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 1.0
    max_new_tokens: int | None = None


class GuidanceConfig(Strict):
    """Guidance as a choice on each axis (see the guided-methods spec's common building blocks)."""

    source: Literal["reference", "hint", "knowledge", "teacher", "critique", "rubric", "reflection"] = "hint"
    trigger: Trigger = Field(default_factory=Trigger)
    injection: Literal["prompt_hint", "response_prefix", "guide_completes", "replace", "auxiliary", "refine", "none"] = "prompt_hint"
    """prompt_hint: text added to the prompt; response_prefix: teacher-forced start of the response;
    guide_completes: the guide finishes the policy's prefix; replace: guidance completions replace
    group members; auxiliary: an expert sequence used only by the calibration term; refine: the policy
    revises its own attempt given the guidance, the revision joins the group; none: no online guidance
    (e.g. only the ReGFT SFT stage)."""
    after_switch: Literal["prompt_hint", "response_prefix", "guide_completes", "replace", "auxiliary", "refine"] | None = None
    """With schedule.kind `phase`: the injection used from schedule.switch_step on (D2LOLS)."""
    context: Literal["keep", "strip"] = "keep"
    """Train under the guided context (keep) or the plain prompt (strip, cross-context ratio)."""
    offpolicy: bool = False
    """Flag guided tokens off-policy (they take algo.loss.offpolicy weighting)."""
    behaviour: Literal["sampled", "one"] = "sampled"
    """Off-policy tokens' behaviour log-prob: as sampled (cross-context ratio, Guide-GRPO) or
    probability one, so the weight is the current probability p itself (LUFFY, Critique-GRPO, HeRL)."""
    place: Literal["replace", "append"] = "replace"
    """replace / refine injections: guidance completions replace failed members (else random ones),
    or are appended to the group (Critique-GRPO's 7 + 1)."""
    members: Literal["all", "graded"] | int = "all"
    """all: re-sample the whole group guided; k: replace k members (failed ones first); graded: member i
    of G gets a share (G-1-i)/(G-1) of the guidance (RuscaRL)."""
    keep_unguided: bool = False
    """Also train the unguided group as its own group (POPE: guided and unguided versions)."""
    prefix: Prefix = Field(default_factory=Prefix)
    schedule: Schedule = Field(default_factory=Schedule)
    teacher: Teacher | None = None
    teachers: list[Teacher] = Field(default_factory=list)
    """Several teachers (AMPO): the ones whose traces the policy comprehends best are used."""
    hint_template: str = "{hint}"
    """How guidance text is added to the prompt ({hint} is replaced)."""
    refine_template: str = (
        "{prompt}\nPrevious attempt:\n{attempt}\nFeedback: {feedback}\nWrite a corrected solution."
    )
    refine_bonus: float = 0.0
    """HeRL: the revised attempt's reward gain times this is added to the original attempt."""
    pivot_mask: bool = False
    """R3L: mask the tokens before the first wrong step (the pivot) in the retry and the attempt."""
    sft_stage: "SFTStage | None" = None
    """ReGFT: before RL, SFT on the policy's own correct traces generated with a partial reference."""

    @model_validator(mode="after")
    def _fits(self) -> "GuidanceConfig":
        if self.source == "teacher" and self.teacher is None and not self.teachers:
            raise ValueError("guidance.source `teacher` needs guidance.teacher (or guidance.teachers)")
        if "guide_completes" in (self.injection, self.after_switch) and self.teacher is None:
            raise ValueError("guidance.injection `guide_completes` needs guidance.teacher")
        return self


class SFTStage(Strict):
    samples: int = 8
    """Tries per problem with the partial reference in the prompt."""
    fraction: float = 0.5
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 32
    max_problems: int | None = 256


GuidanceConfig.model_rebuild()
