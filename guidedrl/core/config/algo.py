"""The algorithm's config: advantage estimator, policy loss, reduction, KL, critic and the other
loss terms (each a discriminated union or a plain node; the pure functions live in guidedrl.algo)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

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


AdvantageConfig = Annotated[
    Union[GRPOAdvantage, RLOOAdvantage, ReinforcePPAdvantage, LitePPOAdvantage, AmplifiedAdvantage, GAEAdvantage],
    Field(discriminator="name"),
]


class OffPolicyWeight(Strict):
    """How tokens flagged off-policy (teacher traces, stripped-hint samples) are weighted."""

    kind: Literal["ratio", "shaped", "none"] = "shaped"
    """ratio: clipped like on-policy; shaped: w/(w+gamma), unclipped; none: w itself, unclipped."""
    gamma: float = 0.1
    gamma_percentile: float | None = None
    """If set, gamma = this quantile of w over the micro-batch's off-policy tokens (Guide-GRPO 0.9)."""
    gamma_min: float = 1e-4


class PPOClipLoss(Strict):
    name: Literal["ppo_clip"] = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    """c > 1 caps the loss of negative-advantage tokens at -A*c (DAPO 10)."""
    clip: bool = True
    """False = the unclipped ratio -A*rho (LUFFY, Critique-GRPO)."""
    offpolicy: OffPolicyWeight = Field(default_factory=OffPolicyWeight)

    @property
    def inert_at_zero_advantage(self) -> bool:
        """Every token's loss is a multiple of its advantage, so a row whose advantages are all 0 adds
        exactly no gradient; not so with a percentile gamma, which every off-policy token shifts."""
        return self.offpolicy.gamma_percentile is None


class ReinforceLoss(Strict):
    """-A * logprob (no ratio), scaled by 1/(1+tau) (R3L's OPMD uses tau=1)."""

    name: Literal["reinforce"] = "reinforce"
    tau: float = 0.0
    inert_at_zero_advantage: ClassVar[bool] = True
    """-A logp: a row whose advantages are all 0 adds exactly no gradient."""


class NFTLoss(Strict):
    name: Literal["nft"] = "nft"
    needs: ClassVar[frozenset[str]] = frozenset({"whole_groups"})
    neg_weight: float = 1.0
    normalize: Literal[0, 1, 2] = 1
    ratio_cap: float = 10.0
    rhat_min: float = 0.02
    rhat_max: float = 0.98


class PACSLoss(Strict):
    name: Literal["pacs"] = "pacs"
    needs: ClassVar[frozenset[str]] = frozenset({"whole_groups"})
    beta: float = 1.0
    balanced: bool = True


class ROVERLoss(Strict):
    name: Literal["rover"] = "rover"
    needs: ClassVar[frozenset[str]] = frozenset({"vocab_mean"})
    """Extra per-token quantities the trainer must compute for this loss."""
    rho: float = 1.0
    next_q_scale: float = 1.0


LossConfig = Annotated[
    Union[PPOClipLoss, ReinforceLoss, NFTLoss, PACSLoss, ROVERLoss], Field(discriminator="name")
]


class ReduceConfig(Strict):
    name: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "sum_over_constant"] = "token_mean"
    constant: float | None = None
    """Divisor for sum_over_constant; None = rollout.max_new_tokens."""


class KLConfig(Strict):
    coef: float = 0.0
    """0 = no reference model is loaded."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    in_reward: bool = False
    """Subtract coef*KL from the per-token reward instead of adding a loss term."""


class DynamicSampling(Strict):
    """DAPO: drop groups whose rewards are all equal; sample more until the batch is full."""

    enabled: bool = False
    max_batches: int = 4
    """Generation rounds allowed per step before the batch counts as short."""
    on_short: Literal["error", "partial"] = "error"
    """A batch still short after max_batches: stop with a clear error (DAPO), or train on what was kept."""


class ValueConfig(Strict):
    """PPO critic: a scalar head on the policy trunk."""

    coef: float = 0.5
    clip: float | None = 0.2


class CalibrationConfig(Strict):
    """CalibRL: |A| * LeakyReLU(-s * (logp - logp_expert)) on on-policy tokens."""

    coef: float = 0.1
    negative_slope: float = 0.5
    success: float = 0.1


class AlgoConfig(Strict):
    advantage: AdvantageConfig = Field(default_factory=GRPOAdvantage)
    loss: LossConfig = Field(default_factory=PPOClipLoss)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    entropy_coef: float = 0.0
    """Entropy bonus (subtracted from the loss)."""
    ce_coef: float = 0.0
    """Cross-entropy (SFT) on tokens of completions flagged `sft`."""
    value: ValueConfig | None = None
    """PPO critic; required by the gae advantage."""
    calibration: CalibrationConfig | None = None
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
