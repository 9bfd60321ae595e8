"""The objective as data: a sum of named loss terms over per-token weights the batch carries.

Every term has one signature, `fn(inp: LossInputs, cfg, reduce: Reducer) -> LossOutputs`, and a
`Term` record says what the update's forward pass must compute for it (`Needs`) and which tokens
its reducer normalizes by (`tokens`). The policy-gradient losses are terms too (`LOSSES`); the
auxiliary ones (`TERMS`) are added to the chosen loss, each times its coefficient. A new term is
one function and one entry in `TERMS` (or a `module:function` name in `algo.terms`), with no edit
to the trainer.

Signs: every term returns a quantity to minimise (the entropy bonus returns minus the entropy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

from guidedrl.algo import losses as L
from guidedrl.core.config import CalibrationConfig, KLConfig, ValueConfig
from guidedrl.core.types import LossInputs, LossOutputs, Reducer

TermFn = Callable[[LossInputs, Any, Reducer], LossOutputs]


@dataclass(frozen=True)
class Needs:
    """What the update's forward pass computes for a term besides the sampled tokens' log-probs."""

    entropy_grad: bool = False
    """The per-token entropy with its gradient (it is always computed as a metric)."""
    vocab_mean: bool = False
    """The mean log-softmax over the vocabulary, now and at rollout (ROVER)."""
    values: bool = False
    """The critic's per-token values."""

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(*(a or b for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


@dataclass(frozen=True)
class Term:
    """A loss term: its function, what it needs computed, and the tokens its reducer counts."""

    fn: TermFn
    needs: Needs = Needs()
    tokens: Literal["loss", "sft"] = "loss"
    """loss: normalized by the loss mask's global counts; sft: by the SFT tokens' (`Batch.sft`)."""


def entropy(inp: LossInputs, cfg: Any, reduce: Reducer) -> LossOutputs:
    """Minus the reduced policy entropy (an entropy *bonus* when its coefficient is positive)."""
    assert inp.entropy is not None, "the entropy term needs LossInputs.entropy (Needs.entropy_grad)"
    return LossOutputs(loss=-L.entropy_bonus(inp.entropy, inp.mask, reduce).loss)


def kl(inp: LossInputs, cfg: KLConfig, reduce: Reducer) -> LossOutputs:
    """KL(pi_theta || pi_ref) by cfg.estimator on the counted tokens."""
    assert inp.ref_logprobs is not None, "the kl term needs reference log-probs (algo.kl.coef > 0 loads the reference)"
    return L.kl_loss(inp.logprobs, inp.ref_logprobs, inp.mask, cfg.estimator, reduce)


def ce(inp: LossInputs, cfg: Any, reduce: Reducer) -> LossOutputs:
    """Cross-entropy (SFT) on the tokens of completions flagged `sft` (reduced over those tokens)."""
    assert inp.sft is not None
    return L.ce_loss(inp.logprobs, inp.mask * inp.sft.to(inp.mask.dtype), reduce)


def value(inp: LossInputs, cfg: ValueConfig, reduce: Reducer) -> LossOutputs:
    """The PPO critic's (clipped) value loss."""
    assert inp.values is not None and inp.old_values is not None and inp.returns is not None, (
        "the value term needs values, old values and returns (a critic and the gae advantage)")
    return L.value_loss(inp.values, inp.old_values, inp.returns, inp.mask, cfg.clip, reduce)


def calibration(inp: LossInputs, cfg: CalibrationConfig, reduce: Reducer) -> LossOutputs:
    """CalibRL's calibration term; positions past the expert's end carry no signal."""
    assert inp.expert_logprobs is not None and inp.expert_mask is not None, (
        "the calibration term needs the expert's log-probs (guidance.injection: auxiliary)")
    return L.calibration(dataclasses.replace(inp, mask=inp.mask * inp.expert_mask), cfg, inp.expert_logprobs, reduce)


LOSSES: dict[str, Term] = {
    "ppo_clip": Term(L.ppo_clip),
    "reinforce": Term(L.reinforce),
    "nft": Term(L.nft),
    "pacs": Term(L.pacs),
    "rover": Term(L.rover, Needs(vocab_mean=True)),
}
"""The policy-gradient losses (`algo.loss.name`)."""

TERMS: dict[str, Term] = {
    "entropy": Term(entropy, Needs(entropy_grad=True)),
    "kl": Term(kl),
    "ce": Term(ce, tokens="sft"),
    "value": Term(value, Needs(values=True)),
    "calibration": Term(calibration),
}
"""Auxiliary terms (`algo.entropy_coef`, `algo.kl`, `algo.ce_coef`, `algo.value`,
`algo.calibration`, and any name listed in `algo.terms`)."""
