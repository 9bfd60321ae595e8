"""Guidance config: a discriminated union keyed on `injection` (how guidance enters a group).

Each injection accepts only the fields it uses, so a combination that would do nothing (a critique
shown as a prompt hint, a `members` count on an injection that replaces one member) is a config
error with its dotted key, not a silent no-op. The common axes (trigger, schedule, an SFT stage)
are on every injection; cross-section checks (an auxiliary expert needs `algo.calibration`,
off-policy tokens need a loss that weights them) are in `Config`'s validator.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from guidedrl.core.config.base import Strict


class Trigger(Strict):
    """When a group gets guidance."""

    kind: Literal["always", "probability", "all_fail", "below_threshold", "offline_hard"] = "all_fail"
    """always | probability (p) | all_fail (no member correct) | below_threshold (best < threshold) |
    offline_hard (prompts the starting policy never solved in a pre-pass of `hard_samples` tries)."""
    p: float = Field(0.5, ge=0, le=1)
    threshold: float = 1.0
    hard_samples: int = Field(8, ge=1)

    @property
    def before_sampling(self) -> bool:
        """Decided before the group is sampled (needs no rewards of the group)."""
        return self.kind in ("always", "probability", "offline_hard")


class Prefix(Strict):
    """How much of the guidance text is shown (reference prefixes, teacher traces)."""

    fraction: float = Field(0.5, ge=0, le=1)
    escalate: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    """Try these fractions in turn while the group still fails (GHPO: [0.25, 0.5, 0.75])."""
    random_range: tuple[float, float] | None = None
    """Draw the fraction uniformly from this range per sample (PrefixRL's several h; RLGF's uniform t)."""
    unit: Literal["chars", "tokens"] = "tokens"

    @model_validator(mode="after")
    def _range(self) -> "Prefix":
        if self.random_range is not None and not 0 <= self.random_range[0] <= self.random_range[1] <= 1:
            raise ValueError(f"random_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(self.random_range)}")
        return self


class Schedule(Strict):
    """How guidance strength changes over training (multiplies the amount / probability)."""

    kind: Literal["fixed", "sigmoid_decay", "linear_decay", "phase"] = "fixed"
    midpoint: float = 0.2
    """sigmoid_decay: 1/(1+exp((x - midpoint) * steepness)) with x = training progress in [0, 1] (RuscaRL)."""
    steepness: float = 125.0
    switch_step: int = Field(0, ge=0)
    """phase: full strength before this step, none from it on."""


class Teacher(Strict):
    """A teacher (guide, helper) model: a local model or an OpenAI-compatible endpoint."""

    path: str | None = "builtin:arith-teacher"
    """Local model like model.path; ignored when `url` is set."""
    url: str | None = None
    """OpenAI-compatible base URL (vLLM serve, SGLang, a hosted API); text only, no log-probs."""
    model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, ge=1)


class SFTStage(Strict):
    """ReGFT: before RL, SFT on the policy's own correct traces generated with a partial reference."""

    samples: int = Field(8, ge=1)
    """Tries per problem with the partial reference as the start of the response."""
    fraction: float = Field(0.5, ge=0, le=1)
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    max_problems: int | None = Field(256, ge=1)


Members = Union[Literal["all", "graded"], Annotated[int, Field(ge=1)]]


class _Common(Strict):
    trigger: Trigger = Field(default_factory=Trigger)
    schedule: Schedule = Field(default_factory=Schedule)
    sft_stage: SFTStage | None = None
    """ReGFT: an SFT stage on reference-guided self-traces before RL."""
    teachers: list[Teacher] = Field(default_factory=list)
    """Teacher models (source `teacher`): the first writes the guidance text; AMPO's replace ranks all."""

    def _needs_teacher(self, source: str) -> None:
        if source == "teacher" and not self.teachers:
            raise ValueError("source `teacher` needs guidance.teachers (one or more)")
        if source != "teacher" and self.teachers:
            raise ValueError(f"guidance.teachers is set but source is `{source}` (teachers are only read by source `teacher`)")


class PromptHint(_Common):
    """Guidance text added to the prompt; the members sample under it."""

    injection: Literal["prompt_hint"] = "prompt_hint"
    source: Literal["reference", "hint", "knowledge", "teacher", "rubric"] = "hint"
    members: Members = "all"
    """all: every member guided; k: k members guided, the rest plain; graded: member i of G sees a
    share (G-1-i)/(G-1) of the guidance (RuscaRL)."""
    context: Literal["keep", "strip"] = "keep"
    """Train under the guided context (keep) or the plain prompt (strip: cross-context ratio)."""
    offpolicy: bool = False
    """Flag guided tokens off-policy (they take algo.loss.offpolicy_weight)."""
    behaviour: Literal["sampled", "one"] = "sampled"
    """Off-policy tokens' behaviour log-prob: as sampled (the cross-context ratio, Guide-GRPO) or
    probability one, so the weight is the current probability p itself."""
    keep_unguided: bool = False
    """Also train the unguided group as its own group (POPE: guided and unguided versions)."""
    prefix: Prefix = Field(default_factory=Prefix)
    template: str = "{guidance}"
    """How guidance text is added to the problem ({guidance} is replaced)."""

    @model_validator(mode="after")
    def _fits(self) -> "PromptHint":
        self._needs_teacher(self.source)
        if self.behaviour == "one" and not self.offpolicy:
            raise ValueError("behaviour `one` weights off-policy tokens: set offpolicy true (or behaviour sampled)")
        if self.context == "strip" and self.keep_unguided:
            raise ValueError("keep_unguided with context `strip` trains the same plain-prompt rows twice")
        return self


class ResponsePrefix(_Common):
    """Guidance text teacher-forced as the start of the response (masked); the policy continues it."""

    injection: Literal["response_prefix"] = "response_prefix"
    source: Literal["reference", "hint", "teacher"] = "reference"
    members: Members = "all"
    keep_unguided: bool = False
    prefix: Prefix = Field(default_factory=Prefix)

    @model_validator(mode="after")
    def _fits(self) -> "ResponsePrefix":
        self._needs_teacher(self.source)
        return self


class Replace(_Common):
    """Guidance completions (the reference solution, teacher traces) put into the group."""

    injection: Literal["replace"] = "replace"
    source: Literal["reference", "teacher"] = "reference"
    count: int = Field(1, ge=1)
    """How many guidance completions enter the group (AMPO: the best-comprehended `count` traces)."""
    place: Literal["replace", "append"] = "replace"
    """replace failed members (failed first, else random ones), or append to the group (G + count)."""
    offpolicy: bool = True

    @model_validator(mode="after")
    def _fits(self) -> "Replace":
        self._needs_teacher(self.source)
        return self


class Refine(_Common):
    """The policy revises its own attempt given feedback; the revision joins the group."""

    injection: Literal["refine"] = "refine"
    source: Literal["critique", "rubric", "reflection"] = "critique"
    place: Literal["replace", "append"] = "replace"
    context: Literal["keep", "strip"] = "keep"
    offpolicy: bool = False
    behaviour: Literal["sampled", "one"] = "sampled"
    template: str = "{prompt}\nPrevious attempt:\n{attempt}\nFeedback: {feedback}\nWrite a corrected solution."
    bonus: float = 0.0
    """HeRL: the revision's reward gain times this is added to the revised attempt."""
    pivot_mask: bool = False
    """R3L: retry from the pivot (the first wrong step); tokens before it are masked."""

    @model_validator(mode="after")
    def _fits(self) -> "Refine":
        if self.behaviour == "one" and not self.offpolicy:
            raise ValueError("behaviour `one` weights off-policy tokens: set offpolicy true (or behaviour sampled)")
        return self


class GuideCompletes(_Common):
    """AggreVaTeD: a teacher finishes each member from a random point of the policy's roll-in."""

    injection: Literal["guide_completes"] = "guide_completes"
    source: Literal["teacher"] = "teacher"
    switch: "Switch | None" = None
    """D2LOLS: from `switch.step` on, guidance is `switch.to` instead."""

    @model_validator(mode="after")
    def _fits(self) -> "GuideCompletes":
        self._needs_teacher(self.source)
        return self


class Auxiliary(_Common):
    """CalibRL: the reference's log-probs as a calibration baseline; never trained on."""

    injection: Literal["auxiliary"] = "auxiliary"
    source: Literal["reference"] = "reference"


class NoInjection(_Common):
    """No online guidance (only the SFT stage, ReGFT)."""

    injection: Literal["none"] = "none"
    source: Literal["reference"] = "reference"

    @model_validator(mode="after")
    def _fits(self) -> "NoInjection":
        if self.sft_stage is None:
            raise ValueError("injection `none` without an sft_stage is no guidance at all: set guidance null")
        return self


GuidanceConfig = Annotated[
    Union[PromptHint, ResponsePrefix, Replace, Refine, GuideCompletes, Auxiliary, NoInjection],
    Field(discriminator="injection"),
]


class Switch(Strict):
    """A phase switch of the injection at a step (D2LOLS: AggreVaTeD, then PPO++)."""

    step: int = Field(ge=0)
    to: GuidanceConfig


GuideCompletes.model_rebuild()
Switch.model_rebuild()
