"""The algorithm's config: advantage estimator, policy loss, reduction, KL, critic and the other
loss terms (each a discriminated union or a plain node; the pure functions live in guidedrl.algo)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from guidedrl.core.config.base import Strict


class GRPOAdvantage(Strict):
    name: Literal["grpo"] = "grpo"
    std: bool = True
    """Divide by the group std (False = Dr.GRPO / LUFFY)."""
    eps: float = 1e-6
    stats_from: Literal["all", "onpolicy"] = "all"
    """Group mean/std over every member, or over on-policy members only (CalibRL)."""


class RLOOAdvantage(Strict):
    name: Literal["rloo"] = "rloo"


class ReinforcePPAdvantage(Strict):
    name: Literal["reinforce_pp"] = "reinforce_pp"
    eps: float = 1e-6
    group_baseline: bool = False
    """Subtract the group mean before batch normalization (REINFORCE++-baseline)."""


class LitePPOAdvantage(Strict):
    name: Literal["lite_ppo"] = "lite_ppo"
    eps: float = 1e-6


class AmplifiedAdvantage(Strict):
    """R3L: A = 1 if r >= success; 3*(r - b) if r >= b; else r - b (b = group mean)."""

    name: Literal["amplified"] = "amplified"
    positive_scale: float = 3.0
    success: float = 1.0


class GAEAdvantage(Strict):
    name: Literal["gae"] = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True


def _name_or(default: str) -> Callable[[Any], str]:
    """A union's tag: the `name` given, or the default variant's when a node sets only its fields
    (`--set algo.loss.dual_clip=10` on the default loss)."""
    return lambda v: v.get("name", default) if isinstance(v, dict) else getattr(v, "name", None)


AdvantageConfig = Annotated[
    Union[tuple(Annotated[c, Tag(c.model_fields["name"].default)] for c in (  # type: ignore[misc]
        GRPOAdvantage, RLOOAdvantage, ReinforcePPAdvantage, LitePPOAdvantage, AmplifiedAdvantage, GAEAdvantage))],
    Discriminator(_name_or("grpo")),
]


class OffPolicyWeight(Strict):
    """How tokens flagged off-policy (teacher traces, stripped-hint samples) are weighted."""

    kind: Literal["ratio", "shaped", "none"] = "shaped"
    """ratio: clipped like on-policy; shaped: w/(w+gamma), unclipped; none: w itself, unclipped."""
    gamma: float = Field(0.1, gt=0)
    gamma_percentile: float | None = Field(None, ge=0, le=1)
    """If set, gamma = this quantile of w over the micro-batch's off-policy tokens (Guide-GRPO 0.9)."""
    gamma_min: float = Field(1e-4, gt=0)


class PolicyLoss(Strict):
    """Base of the policy-gradient losses: what the trainer must know about each, as typed flags."""

    whole_groups: ClassVar[bool] = False
    """Computes group statistics inside the loss, so micro-batches must hold whole groups."""
    weights_offpolicy: ClassVar[bool] = False
    """Weights tokens flagged off-policy (guidance.offpolicy) differently from on-policy ones."""

    @property
    def inert_at_zero_advantage(self) -> bool:
        """Every token's loss is a multiple of its advantage, so a row whose advantages are all 0
        adds exactly no gradient (the update may leave such rows out)."""
        return False


class PPOClipLoss(PolicyLoss):
    name: Literal["ppo_clip"] = "ppo_clip"
    eps_low: float = Field(0.2, ge=0, lt=1)
    eps_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    """c > 1 caps the loss of negative-advantage tokens at -A*c (DAPO 10)."""
    clip: bool = True
    """False = the unclipped ratio -A*rho (LUFFY, Critique-GRPO)."""
    offpolicy_weight: OffPolicyWeight = Field(default_factory=OffPolicyWeight)
    weights_offpolicy: ClassVar[bool] = True

    @property
    def inert_at_zero_advantage(self) -> bool:
        """Not with a percentile gamma, which every off-policy token shifts."""
        return self.offpolicy_weight.gamma_percentile is None


class ReinforceLoss(PolicyLoss):
    """-A * logprob (no ratio), scaled by 1/(1+tau) (R3L's OPMD uses tau=1)."""

    name: Literal["reinforce"] = "reinforce"
    tau: float = Field(0.0, gt=-1)

    @property
    def inert_at_zero_advantage(self) -> bool:
        return True


class NFTLoss(PolicyLoss):
    name: Literal["nft"] = "nft"
    neg_weight: float = Field(1.0, ge=0)
    """>= 0 (NFT's -1 switch to the DAPO loss is loss.name ppo_clip here)."""
    normalize: Literal[0, 1, 2] = 1
    ratio_cap: float = 10.0
    rhat_min: float = Field(0.02, gt=0, lt=1)
    rhat_max: float = Field(0.98, gt=0, lt=1)
    whole_groups: ClassVar[bool] = True

    @model_validator(mode="after")
    def _rhat(self) -> "NFTLoss":
        if self.rhat_min > self.rhat_max:
            raise ValueError(f"rhat_min ({self.rhat_min}) must be <= rhat_max ({self.rhat_max})")
        return self


class PACSLoss(PolicyLoss):
    name: Literal["pacs"] = "pacs"
    beta: float = 1.0
    balanced: bool = True
    whole_groups: ClassVar[bool] = True


class ROVERLoss(PolicyLoss):
    name: Literal["rover"] = "rover"
    rho: float = 1.0
    next_q_scale: float = 1.0


LossConfig = Annotated[
    Union[tuple(Annotated[c, Tag(c.model_fields["name"].default)] for c in (  # type: ignore[misc]
        PPOClipLoss, ReinforceLoss, NFTLoss, PACSLoss, ROVERLoss))],
    Discriminator(_name_or("ppo_clip")),
]


class ReduceConfig(Strict):
    name: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "sum_over_constant"] = "token_mean"
    constant: float | None = Field(None, gt=0)
    """Divisor for sum_over_constant; None = rollout.max_new_tokens."""


class KLConfig(Strict):
    coef: float = Field(0.0, ge=0)
    """0 = no reference model is loaded."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    in_reward: bool = False
    """Subtract coef*KL from the per-token reward instead of adding a loss term."""


class DynamicSampling(Strict):
    """DAPO: drop groups whose rewards are all equal; sample more until the batch is full."""

    enabled: bool = False
    max_batches: int = Field(4, ge=1)
    """Generation rounds allowed per step before the batch counts as short."""
    on_short: Literal["error", "partial"] = "error"
    """A batch still short after max_batches: stop with a clear error (DAPO), or train on what was kept."""


class ValueConfig(Strict):
    """PPO critic: a scalar head on the policy trunk."""

    coef: float = Field(0.5, gt=0)
    clip: float | None = Field(0.2, gt=0)


class CalibrationConfig(Strict):
    """CalibRL: |A| * LeakyReLU(-s * (logp - logp_expert)) on on-policy tokens."""

    coef: float = Field(0.1, gt=0)
    negative_slope: float = 0.5
    success: float = 0.1


class TermConfig(Strict):
    """One more loss term: a name in `guidedrl.algo.TERMS` or `module:function` (the function takes
    `(inp: LossInputs, args: dict, reduce: Reducer) -> LossOutputs`), its coefficient and arguments."""

    name: str
    coef: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)


class AlgoConfig(Strict):
    advantage: AdvantageConfig = Field(default_factory=GRPOAdvantage)
    loss: LossConfig = Field(default_factory=PPOClipLoss)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    entropy_coef: float = 0.0
    """Entropy bonus (subtracted from the loss)."""
    ce_coef: float = Field(0.0, ge=0)
    """Cross-entropy (SFT) on tokens of completions flagged `sft` (guidance.injection replace)."""
    value: ValueConfig | None = None
    """PPO critic; required by the gae advantage."""
    calibration: CalibrationConfig | None = None
    """CalibRL's calibration term; needs guidance.injection auxiliary (the expert sequence)."""
    terms: list[TermConfig] = Field(default_factory=list)
    """More loss terms, each a registered name or `module:function` (see TermConfig)."""
    epochs: int = Field(1, ge=1)
    """Passes over each step's rollouts; >1 needs an old-log-prob pass."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per epoch."""
    dynamic_sampling: DynamicSampling = Field(default_factory=DynamicSampling)
    mask_truncated: bool = False
    """Zero the loss mask of completions that hit max_new_tokens (DAPO overlong filtering)."""

    @model_validator(mode="after")
    def _needs(self) -> "AlgoConfig":
        gae = isinstance(self.advantage, GAEAdvantage)
        if gae and self.value is None:
            raise ValueError("advantage `gae` needs `algo.value` (a critic)")
        if self.kl.in_reward and not gae:
            raise ValueError("kl.in_reward needs a per-token advantage (advantage.name: gae); use a KL loss term instead")
        return self
