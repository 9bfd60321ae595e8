"""One optimizer update over a step's rollouts: the loss is a sum of components, each reduced with
its own global normalizer, accumulated over micro-batches. Algorithm-blind: the recipe chose the
functions (resolved once in `Objective.from_config`), and tokens carry their own mask and flags.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from guidedrl import algo
from guidedrl.core import dist
from guidedrl.algo import losses as L
from guidedrl.algo.reduce import build_reducer
from guidedrl.core.config import AlgoConfig, ReduceConfig
from guidedrl.core.errors import UserError
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.core.types import Batch, LossInputs, Reducer


class NonFiniteError(UserError):
    """Too many non-finite losses or gradients in a row (a clear message, not a traceback)."""


@dataclass
class Objective:
    """The loss components a recipe chose, resolved from config once."""

    cfg: AlgoConfig
    loss_fn: Callable[..., Any]
    temperature: float
    default_constant: float
    needs: frozenset[str] = field(default_factory=frozenset)
    compiled: bool = False
    """torch.compile the per-chunk log-prob / entropy pass (`train.compile_logprobs`)."""
    skip_inert: bool = False
    """Leave rows that add no gradient out of the update (`train.skip_inert_rows`; `inert_rows`)."""
    cascade: bool = True
    """Cascade attention in the shared-prompt forward on CPU (`train.cascade_attention`)."""

    @classmethod
    def from_config(
        cls, cfg: AlgoConfig, temperature: float, max_new_tokens: int, compiled: bool = False, skip_inert: bool = False,
        cascade: bool = True,
    ) -> "Objective":
        return cls(
            cfg=cfg,
            loss_fn=algo.get(algo.LOSSES, cfg.loss.name, "algo.loss.name"),
            temperature=temperature,
            default_constant=float(max_new_tokens),
            needs=cfg.loss.needs,
            compiled=compiled,
            skip_inert=skip_inert,
            cascade=cascade,
        )

    def inert_rows(self, batch: Batch) -> Tensor:
        """(B,) rows whose gradient is exactly zero: every counted advantage is 0, the loss is a
        multiple of the advantage token by token, and no other term reads the row. All False when
        skipping is off or the objective has such a term."""
        c = self.cfg
        other_terms = (c.entropy_coef or (c.kl.coef and not c.kl.in_reward) or c.ce_coef or c.value is not None
                       or c.calibration is not None)
        if not self.skip_inert or other_terms or not getattr(c.loss, "inert_at_zero_advantage", False):
            return torch.zeros(len(batch), dtype=torch.bool, device=batch.mask.device)
        assert batch.advantages is not None, "advantages must be computed before the update"
        return ((batch.advantages * batch.mask) == 0).all(-1)  # (B,)

    def micro_loss(
        self, model: nn.Module, mb: Batch, red: Reducer, ce_red: Reducer, value_head: nn.Module | None,
        metric_red: Reducer | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch, already scaled so that micro-batch losses sum to the batch loss.

        metric_red: the reducer of the logged entropy when it is only a metric (the trained rows'
        counts, when inert rows were left out); default `red`."""
        c = self.cfg
        out = policy_outputs(
            model, mb, temperature=self.temperature, entropy="grad" if c.entropy_coef else "metric",
            vocab_mean="vocab_mean" in self.needs, value_head=value_head, compiled=self.compiled, cascade=self.cascade,
        )
        assert mb.advantages is not None, "advantages must be computed before the update"
        inp = LossInputs(
            logprobs=out.logprobs, old_logprobs=mb.old_logprobs, advantages=mb.advantages, mask=mb.mask,
            offpolicy=mb.offpolicy, rewards=mb.rewards, group_ids=mb.group_ids, values=out.values,
            old_values=mb.old_values, returns=mb.returns, vocab_mean_logprobs=out.vocab_mean_logprobs,
            old_vocab_mean_logprobs=mb.extras.get("old_vocab_mean_logprobs"),
        )
        pg = self.loss_fn(inp, c.loss, red)
        total = pg.loss
        metrics = {f"loss/{k}" if k == "policy" else k: v for k, v in pg.metrics.items()}
        metrics["loss/policy"] = float(pg.loss.detach())
        ent = L.entropy_bonus(out.entropy, mb.mask, red if c.entropy_coef or metric_red is None else metric_red)
        metrics["entropy"] = float(ent.loss.detach())
        if c.entropy_coef:
            total = total - c.entropy_coef * ent.loss
        if c.kl.coef and not c.kl.in_reward:
            assert mb.ref_logprobs is not None, "kl.coef > 0 needs reference log-probs"
            kl = L.kl_loss(out.logprobs, mb.ref_logprobs, mb.mask, c.kl.estimator, red)
            total = total + c.kl.coef * kl.loss
            metrics["kl"] = float(kl.loss.detach())
        if c.ce_coef:
            ce = L.ce_loss(out.logprobs, mb.mask * mb.sft.float(), ce_red)
            total = total + c.ce_coef * ce.loss
            metrics["loss/ce"] = float(ce.loss.detach())
        if c.value is not None:
            assert out.values is not None and mb.returns is not None and mb.old_values is not None
            vl = L.value_loss(out.values, mb.old_values, mb.returns, mb.mask, c.value.clip, red)
            total = total + c.value.coef * vl.loss
            metrics["loss/value"] = float(vl.loss.detach())
        if c.calibration is not None and "expert_logprobs" in mb.extras:
            # the expert is aligned by position: positions past its end carry no calibration signal
            cal_inp = dataclasses.replace(inp, mask=inp.mask * mb.extras["expert_mask"])
            cal = L.calibration(cal_inp, c.calibration, mb.extras["expert_logprobs"], red)
            total = total + c.calibration.coef * cal.loss
            metrics["loss/calibration"] = float(cal.loss.detach())
        return total, metrics


def _length_sorted_micro_batches(batch: Batch, size: int, tokens: int | None = None) -> list[list[int]]:
    """Rows cut into micro-batches, whole groups ordered by their longest row, so that each trimmed
    micro-batch pads to a length close to its own rows' (and a group's rows, which share a prompt,
    stay together for the shared-prompt forward). The losses reduce with whole-batch normalizers, so
    the order of rows changes nothing but float summation order.

    size: at most this many rows a micro-batch. tokens (`train.micro_batch_tokens`): instead, whole
    groups up to this many tokens a micro-batch, counted as rows x the longest row's real tokens (what
    the trimmed micro-batch holds, about); a group over the budget is a micro-batch of its own.
    """
    groups = batch.group_ids.tolist()
    longest: dict[int, int] = {}
    for g, n in zip(groups, batch.attention_mask.sum(-1).tolist(), strict=True):  # real tokens per row
        longest[g] = max(longest.get(g, 0), n)
    order = sorted(range(len(groups)), key=lambda i: (longest[groups[i]], groups[i], i))
    if tokens is None:
        return [order[s : s + size] for s in range(0, len(order), size)]
    sizes = Counter(groups)
    out: list[list[int]] = []
    for i in order:  # a group's rows are adjacent in `order`, groups in ascending length
        g = groups[i]
        # a group joining is the longest so far (ascending order): the micro-batch pads to its length
        if not out or (groups[out[-1][-1]] != g and (len(out[-1]) + sizes[g]) * longest[g] > tokens):
            out.append([])
        out[-1].append(i)
    return out


def sorted_forward(batch: Batch, size: int, fn: Callable[[Batch], list[Tensor | None]]) -> list[Tensor | None]:
    """fn over length-sorted, trimmed micro-batches of `size` rows (the no-grad passes: old and reference
    log-probs, old values), its (b, R') outputs put back in row order as (B, R), zero past a micro-batch's R'
    (trimming cuts only all-padding columns: the right end of the responses). None stays None."""
    B, R = batch.response_mask.shape
    outs: list[Tensor | None] = []
    for rows in _length_sorted_micro_batches(batch, size):
        got = fn(batch.select(rows).trimmed())
        if not outs:
            outs = [None if g is None else g.new_zeros((B, R)) for g in got]
        idx = torch.tensor(rows, device=batch.response_mask.device)
        for o, g in zip(outs, got, strict=True):
            if o is not None and g is not None:
                o[idx, : g.shape[1]] = g
    return outs


def _accumulate(metrics: dict[str, float], new: dict[str, float], share: float) -> None:
    for k, v in new.items():
        metrics[k] = metrics.get(k, 0.0) + (v if k.startswith(("loss/", "entropy", "kl")) else v * share)


def optimizer_step(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    obj: Objective,
    batch: Batch,
    *,
    micro_batch_size: int,
    grad_clip: float | None,
    value_head: nn.Module | None = None,
    micro_batch_tokens: int | None = None,
) -> tuple[dict[str, float], bool]:
    """Accumulate gradients over micro-batches of `batch` (`micro_batch_size` rows, or whole groups up
    to `micro_batch_tokens` tokens), then step. -> (metrics, finite)."""
    red = build_reducer(obj.cfg.reduce, batch.mask, obj.default_constant)
    ce_red = build_reducer(ReduceConfig(name="token_mean"), batch.mask * batch.sft.float(), obj.default_constant)
    keep = (~obj.inert_rows(batch)).nonzero().squeeze(-1).tolist()  # rows with a gradient
    trained = batch if len(keep) == len(batch) else batch.select(keep)
    metric_red = build_reducer(obj.cfg.reduce, trained.mask, obj.default_constant)  # on every process: a collective
    optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {"update/skipped_rows": 1.0 - len(keep) / len(batch)}
    finite = True
    for rows in _length_sorted_micro_batches(trained, micro_batch_size, micro_batch_tokens) if keep else []:
        loss, m = obj.micro_loss(model, trained.select(rows).trimmed(), red, ce_red, value_head, metric_red)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        _accumulate(metrics, m, len(rows) / len(trained))
    if not keep:  # every row inert: the gradient is exactly zero, and AdamW still steps its moments on it
        for p in params:
            p.grad = torch.zeros_like(p)
    finite = dist.all_true(finite)  # every process skips, or none does (the collective below needs all)
    if finite:
        dist.sum_gradients(params)  # each process holds its share of the global loss: sum the shares
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    if not finite or not math.isfinite(float(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return metrics | {"nonfinite": 1.0}, False
    optimizer.step()
    scheduler.step()
    metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = float(scheduler.get_last_lr()[0])
    return metrics, True


@torch.no_grad()
def recompute_old(model: nn.Module, batch: Batch, obj: Objective, micro_batch_size: int, rows_only: bool = False) -> None:
    """pi_old = the policy at rollout time, recomputed under the training context.

    Off-policy rows keep their behaviour log-probs (cross-context ratios, teacher text).
    rows_only: recompute only `batch.recompute_rows` (sampled under a guided context, trained under
    the plain one without an importance weight, e.g. RuscaRL's stripped scaffolds).
    """
    was = model.training
    model.eval()
    keep = batch.offpolicy.any(-1)  # (B,) rows whose behaviour log-probs must stay
    if rows_only:
        keep = keep | ~batch.recompute_rows

    def run(mb: Batch) -> list[Tensor | None]:
        out = policy_outputs(model, mb, temperature=obj.temperature, vocab_mean="vocab_mean" in obj.needs,
                             compiled=obj.compiled, cascade=obj.cascade)
        return [out.logprobs, out.vocab_mean_logprobs]

    lp, mean = sorted_forward(batch, micro_batch_size, run)
    model.train(was)
    assert lp is not None
    new = lp * batch.response_mask  # (B, R)
    batch.old_logprobs = torch.where(keep[:, None], batch.old_logprobs, new)
    if mean is not None:
        batch.extras["old_vocab_mean_logprobs"] = mean * batch.response_mask


@torch.no_grad()
def reference_logprobs(
    ref: nn.Module, batch: Batch, temperature: float, micro_batch_size: int, cascade: bool = True
) -> Tensor:
    """Reference-model log-probs of the response tokens: (B, R) (cascade: `train.cascade_attention`)."""
    lp, = sorted_forward(batch, micro_batch_size,
                          lambda mb: [policy_outputs(ref, mb, temperature=temperature, cascade=cascade).logprobs])
    assert lp is not None
    return lp * batch.response_mask
