"""Every pass of the update over one step's batch, in one place: the no-grad passes (reference
log-probs, behaviour log-probs recomputed under the training context, the critic's values), then
epochs x minibatches of optimizer steps, each accumulating the objective's gradient over
micro-batches. Algorithm-blind: the objective sums the recipe's terms, and tokens carry their own
masks and flags.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from guidedrl.algo.metrics import logprob_agreement
from guidedrl.algo.reduce import build_reducer
from guidedrl.core import dist
from guidedrl.core.errors import UserError
from guidedrl.core.config import AlgoConfig, TrainConfig
from guidedrl.core.types import Batch
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.trainer.objective import Objective


class NonFiniteError(UserError):
    """Too many non-finite losses or gradients in a row (a clear message, not a traceback)."""


@dataclass
class Optim:
    """The optimizer over the trainable parameters and its learning-rate schedule."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any


def micro_batches(batch: Batch, size: int, tokens: int | None = None) -> list[list[int]]:
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


@torch.no_grad()
def sorted_forward(batch: Batch, size: int, fn: Callable[[Batch], list[Tensor | None]]) -> list[Tensor | None]:
    """fn over length-sorted, trimmed micro-batches of `size` rows (the no-grad passes), its (b, R')
    outputs put back in row order as (B, R), zero past a micro-batch's R' (trimming cuts only
    all-padding columns: the right end of the responses). None stays None."""
    B, R = batch.response_mask.shape
    outs: list[Tensor | None] = []
    for rows in micro_batches(batch, size):
        got = fn(batch.select(rows).trimmed())
        if not outs:
            outs = [None if g is None else g.new_zeros((B, R)) for g in got]
        idx = torch.tensor(rows, device=batch.response_mask.device)
        for o, g in zip(outs, got, strict=True):
            if o is not None and g is not None:
                o[idx, : g.shape[1]] = g
    return outs


def reference_logprobs(ref: nn.Module, batch: Batch, obj: Objective, micro_batch_size: int) -> Tensor:
    """Reference-model log-probs of the response tokens: (B, R)."""
    lp, = sorted_forward(batch, micro_batch_size, lambda mb: [
        policy_outputs(ref, mb, temperature=obj.temperature, cascade=obj.cascade).logprobs])
    assert lp is not None
    return lp * batch.response_mask


def old_values(model: nn.Module, value_head: nn.Module, batch: Batch, obj: Objective, micro_batch_size: int) -> Tensor:
    """The critic's values at rollout time: (B, R)."""
    vals, = sorted_forward(batch, micro_batch_size, lambda mb: [
        policy_outputs(model, mb, value_head=value_head, cascade=obj.cascade).values])
    assert vals is not None
    return vals * batch.response_mask


def recompute_behaviour(model: nn.Module, batch: Batch, obj: Objective, micro_batch_size: int,
                        rows_only: bool) -> dict[str, float]:
    """Behaviour log-probs recomputed by the current policy under the training context (pi_old of
    the epochs that follow). Off-policy rows keep theirs (cross-context ratios, teacher text).
    rows_only: recompute only `batch.recompute_rows` (sampled under a guided context, trained under
    the plain one without an importance weight, e.g. RuscaRL's stripped scaffolds).
    -> the rollout-vs-update log-prob agreement on the rows sampled as they are trained (when all
    rows are recomputed; else the first optimizer step measures it)."""
    was = model.training
    model.eval()
    keep = batch.offpolicy.any(-1)  # (B,) rows whose behaviour log-probs must stay
    if rows_only:
        keep = keep | ~batch.recompute_rows
    vocab_mean = obj.needs.vocab_mean

    def run(mb: Batch) -> list[Tensor | None]:
        out = policy_outputs(model, mb, temperature=obj.temperature, vocab_mean=vocab_mean, compiled=obj.compiled,
                             cascade=obj.cascade)
        return [out.logprobs, out.vocab_mean_logprobs]

    lp, mean = sorted_forward(batch, micro_batch_size, run)
    model.train(was)
    assert lp is not None
    new = lp * batch.response_mask  # (B, R)
    agreement = {} if rows_only else logprob_agreement(new, batch.behaviour_logprobs, same_context_tokens(batch))
    batch.behaviour_logprobs = torch.where(keep[:, None], batch.behaviour_logprobs, new)
    if mean is not None:
        batch.behaviour_vocab_mean = mean * batch.response_mask
    return agreement


def same_context_tokens(batch: Batch) -> Tensor:
    """(B, R) the trained tokens of on-policy rows sampled in the context they are trained under:
    where the rollout's and the update's log-probs should agree."""
    rows = batch.onpolicy_rows & ~batch.recompute_rows  # (B,)
    return batch.mask * rows[:, None].to(batch.mask.dtype)


def _accumulate(metrics: dict[str, float], new: dict[str, float], share: float) -> None:
    """Reduced losses (already global) sum over micro-batches; local metrics average by rows."""
    for k, v in new.items():
        summed = k.startswith("loss/") or k == "policy/entropy"
        metrics[k] = metrics.get(k, 0.0) + (v if summed else v * share)


def optimizer_step(model: nn.Module, optim: Optim, obj: Objective, batch: Batch, *, micro_batch_size: int,
                   grad_clip: float | None, value_head: nn.Module | None = None,
                   micro_batch_tokens: int | None = None, agreement: bool = False) -> tuple[dict[str, float], bool]:
    """Accumulate gradients over micro-batches of `batch` (`micro_batch_size` rows, or whole groups up
    to `micro_batch_tokens` tokens), then step. agreement: also log the rollout-vs-update log-prob
    agreement (the first pass over freshly sampled rows). -> (metrics, finite)."""
    reducers = obj.reducers(batch)
    keep = (~obj.inert_rows(batch)).nonzero().squeeze(-1).tolist()  # rows with a gradient
    trained = batch if len(keep) == len(batch) else batch.select(keep)
    metric_red = build_reducer(obj.cfg.reduce, trained.mask, obj.default_constant)  # on every process: a collective
    optim.optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, float] = {"perf/skipped_rows": 1.0 - len(keep) / len(batch)}
    finite = True
    for rows in micro_batches(trained, micro_batch_size, micro_batch_tokens) if keep else []:
        mb = trained.select(rows).trimmed()
        loss, m, logprobs = obj.micro_loss(model, mb, reducers, value_head, metric_red)
        if agreement:
            m |= logprob_agreement(logprobs, mb.behaviour_logprobs, same_context_tokens(mb))
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        _accumulate(metrics, m, len(rows) / len(trained))
    if not keep:  # every row inert: the gradient is exactly zero, and AdamW still steps its moments on it
        for p in optim.params:
            p.grad = torch.zeros_like(p)
    finite = dist.all_true(finite)  # every process skips, or none does (the collective below needs all)
    if finite:
        dist.sum_gradients(optim.params)  # each process holds its share of the global loss: sum the shares
    grad_norm = torch.nn.utils.clip_grad_norm_(optim.params, grad_clip if grad_clip else float("inf"))
    if not finite or not math.isfinite(float(grad_norm)):
        optim.optimizer.zero_grad(set_to_none=True)
        return metrics | {"policy/nonfinite": 1.0}, False
    optim.optimizer.step()
    optim.scheduler.step()
    return metrics | {"policy/grad_norm": float(grad_norm), "policy/lr": float(optim.scheduler.get_last_lr()[0])}, True


def update(model: nn.Module, optim: Optim, obj: Objective, batch: Batch, *, algo: AlgoConfig, train: TrainConfig,
           value_head: nn.Module | None) -> tuple[dict[str, float], bool]:
    """Epochs x minibatches optimizer steps over the batch (behaviour log-probs recomputed first when
    a later pass or the loss needs them). -> (metrics averaged over the steps, False at the first
    non-finite step, which is skipped and ends the update)."""
    metrics: dict[str, float] = {}
    full = algo.epochs > 1 or algo.minibatches > 1 or obj.needs.vocab_mean
    if full or bool(batch.recompute_rows.any()):
        metrics |= recompute_behaviour(model, batch, obj, train.micro_batch_size, rows_only=not full)
    steps = algo.epochs * algo.minibatches
    for epoch in range(algo.epochs):
        order = torch.randperm(len(batch)).tolist() if algo.minibatches > 1 else list(range(len(batch)))
        size = len(batch) // algo.minibatches
        for m in range(algo.minibatches):
            got, ok = optimizer_step(model, optim, obj, batch.select(order[m * size : (m + 1) * size]),
                                     micro_batch_size=train.micro_batch_size, grad_clip=train.grad_clip,
                                     value_head=value_head, micro_batch_tokens=train.micro_batch_tokens,
                                     agreement=not full and epoch == 0 and m == 0)
            if not ok:
                return metrics | got, False
            for k, v in got.items():
                metrics[k] = metrics.get(k, 0.0) + (v if k.startswith("policy/rollout_") else v / steps)
    return metrics, True
