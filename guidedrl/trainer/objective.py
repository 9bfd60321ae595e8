"""The objective of one optimizer update: the chosen policy loss plus auxiliary terms, each a
named pure function (`guidedrl.algo.terms`) times its coefficient, reduced with its own global
normalizer. Resolved from the config once (`Objective.from_config`); the update never branches on
an algorithm: it sums the terms."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from guidedrl import algo
from guidedrl.algo.reduce import build_reducer
from guidedrl.algo.terms import LOSSES, TERMS, Needs, Term
from guidedrl.core.config import AlgoConfig, ReduceConfig, TermConfig
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Batch, LossInputs, Reducer
from guidedrl.nn.logprobs import policy_outputs


@dataclass(frozen=True)
class ActiveTerm:
    """A term of this run: name (its metric is `loss/<name>`), coefficient, function and config."""

    name: str
    coef: float
    term: Term
    cfg: Any


def _custom_term(t: TermConfig, i: int) -> Term:
    """A term of `algo.terms`: a registered name, or `module:function` (a plain term, no extra needs)."""
    if t.name in TERMS:
        return TERMS[t.name]
    mod, _, fn = t.name.partition(":")
    if not fn:
        raise ConfigError(f"`algo.terms[{i}].name`: unknown term {t.name!r}; registered: {', '.join(sorted(TERMS))}, "
                          "or give module:function")
    try:
        return Term(getattr(importlib.import_module(mod), fn))
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"`algo.terms[{i}].name`: cannot load {t.name!r}: {e}") from None


def active_terms(a: AlgoConfig) -> list[ActiveTerm]:
    """The policy loss first, then every auxiliary term the config turns on."""
    terms = [ActiveTerm("policy", 1.0, LOSSES[a.loss.name], a.loss)]
    if a.entropy_coef:
        terms.append(ActiveTerm("entropy", a.entropy_coef, TERMS["entropy"], None))
    if a.kl.coef and not a.kl.in_reward:
        terms.append(ActiveTerm("kl", a.kl.coef, TERMS["kl"], a.kl))
    if a.ce_coef:
        terms.append(ActiveTerm("ce", a.ce_coef, TERMS["ce"], None))
    if a.value is not None:
        terms.append(ActiveTerm("value", a.value.coef, TERMS["value"], a.value))
    if a.calibration is not None:
        terms.append(ActiveTerm("calibration", a.calibration.coef, TERMS["calibration"], a.calibration))
    for i, t in enumerate(a.terms):
        terms.append(ActiveTerm(t.name.rpartition(":")[2], t.coef, _custom_term(t, i), t.args))
    return terms


@dataclass
class Objective:
    """The loss terms a recipe chose and how the update's forward computes them."""

    cfg: AlgoConfig
    terms: list[ActiveTerm]
    temperature: float
    default_constant: float
    compiled: bool = False
    """torch.compile the per-chunk log-prob / entropy pass (`train.compile_logprobs`)."""
    skip_inert: bool = False
    """Leave rows that add no gradient out of the update (`train.skip_inert_rows`; `inert_rows`)."""
    cascade: bool = True
    """Cascade attention in the shared-prompt forward on CPU (`train.cascade_attention`)."""

    @classmethod
    def from_config(cls, cfg: AlgoConfig, temperature: float, max_new_tokens: int, *, compiled: bool = False,
                    skip_inert: bool = False, cascade: bool = True) -> "Objective":
        algo.get(LOSSES, cfg.loss.name, "algo.loss.name")
        return cls(cfg, active_terms(cfg), temperature, float(max_new_tokens), compiled, skip_inert, cascade)

    @property
    def needs(self) -> Needs:
        out = Needs()
        for t in self.terms:
            out = out | t.term.needs
        return out

    def reducers(self, batch: Batch) -> dict[str, Reducer]:
        """One reducer per token set the terms normalize by, bound to the WHOLE batch's global counts
        (so micro-batch losses sum to the batch loss, on every process: a collective)."""
        masks = {"loss": batch.mask, "sft": batch.mask * batch.sft.float()}
        kinds = {t.term.tokens for t in self.terms} | {"loss"}
        return {k: build_reducer(self.cfg.reduce if k == "loss" else ReduceConfig(name="token_mean"), masks[k],
                                 self.default_constant) for k in sorted(kinds)}

    def inert_rows(self, batch: Batch) -> Tensor:
        """(B,) rows whose gradient is exactly zero: every counted advantage is 0, the objective is
        the policy loss alone, and that loss is a multiple of the advantage token by token. All
        False when skipping is off or another term reads the row."""
        if not self.skip_inert or len(self.terms) > 1 or not self.cfg.loss.inert_at_zero_advantage:
            return torch.zeros(len(batch), dtype=torch.bool, device=batch.mask.device)
        assert batch.advantages is not None, "advantages must be computed before the update"
        return ((batch.advantages * batch.mask) == 0).all(-1)  # (B,)

    def micro_loss(self, model: nn.Module, mb: Batch, reducers: dict[str, Reducer], value_head: nn.Module | None,
                   metric_red: Reducer | None = None) -> tuple[Tensor, dict[str, float], Tensor]:
        """Loss of one micro-batch, already scaled so that micro-batch losses sum to the batch loss.

        metric_red: the reducer of the logged entropy (the trained rows' counts, when inert rows
        were left out); default the loss reducer. -> (loss, metrics, the current log-probs (b, R))."""
        need = self.needs
        out = policy_outputs(model, mb, temperature=self.temperature, entropy="grad" if need.entropy_grad else "metric",
                             vocab_mean=need.vocab_mean, value_head=value_head, compiled=self.compiled,
                             cascade=self.cascade)
        assert mb.advantages is not None, "advantages must be computed before the update"
        inp = LossInputs(
            logprobs=out.logprobs, behaviour_logprobs=mb.behaviour_logprobs, advantages=mb.advantages, mask=mb.mask,
            offpolicy=mb.offpolicy, sft=mb.sft, rewards=mb.rewards, group_ids=mb.group_ids, entropy=out.entropy,
            ref_logprobs=mb.ref_logprobs, values=out.values, old_values=mb.old_values, returns=mb.returns,
            vocab_mean_logprobs=out.vocab_mean_logprobs, behaviour_vocab_mean=mb.behaviour_vocab_mean,
            expert_logprobs=mb.expert_logprobs, expert_mask=mb.expert_mask,
        )
        total: Tensor | float = 0.0
        metrics: dict[str, float] = {}
        for t in self.terms:
            got = t.term.fn(inp, t.cfg, reducers[t.term.tokens])
            total = total + t.coef * got.loss
            metrics[f"loss/{t.name}"] = float(got.loss.detach())
            metrics |= {f"policy/{k}": v for k, v in got.metrics.items()}
        assert out.entropy is not None
        ent = (metric_red or reducers["loss"]).tokens(out.entropy.detach(), mb.mask)
        metrics["policy/entropy"] = float(ent)
        return total, metrics, out.logprobs  # type: ignore[return-value]
