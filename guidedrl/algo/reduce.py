"""Loss reductions with global normalizers (verl's `agg_loss` modes, bound once per optimizer step).

`build_reducer(cfg, mask, default_constant)` counts the tokens and sequences of the WHOLE optimizer
batch once (summed over processes with `dist.global_sum`). Each micro-batch then divides by those
global counts, so summing the micro-batch losses gives exactly the loss of the whole batch, and
each process returns its share of the global loss (the shares sum over processes to the global
loss). The trainer therefore SUMS gradients over processes (`dist.sum_gradients`); a wrapper that
averages them (DDP/FSDP) would need the loss multiplied by `dist.world_size()` first, as verl
multiplies by dp_size.

Modes (per-token loss l_it, mask m_it, n_i = sum_t m_it):
- token_mean:           sum_it l m / sum_it m                        (DAPO, Lite PPO)
- seq_mean_token_mean:  (1/S) sum_i [sum_t l m / n_i]                (GRPO paper)
- seq_mean_token_sum:   (1/S) sum_i sum_t l m
- sum_over_constant:    sum_it l m / (S * constant)                  (Dr.GRPO, constant = max length)
and `seqs(loss (B,)) = sum_i loss_i / S` for per-sequence losses (PACS).

S counts only sequences with at least one counted token: a row whose mask is all zero (an
overlong-filtered or empty completion, padding rows) is not a sequence of the loss, just as its
tokens are not tokens of token_mean (verl's `exclude_fully_masked_seq=True`; verl's default counts
every row). Callers of `seqs` must give such rows a zero loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from guidedrl.core import dist
from guidedrl.core.config import ReduceConfig
from guidedrl.core.errors import ConfigError


@dataclass(frozen=True)
class Counts:
    """Global normalizers of one optimizer batch."""

    tokens: float  # sum of the mask over every row of every process
    seqs: float  # rows with at least one counted token, over every process
    constant: float  # divisor of sum_over_constant


def _masked(loss: Tensor, mask: Tensor) -> Tensor:
    """loss * mask, with exactly 0 (not NaN) where mask is 0 even if loss there is inf/NaN."""
    assert loss.shape == mask.shape, f"loss {tuple(loss.shape)} vs mask {tuple(mask.shape)}"
    m = mask.to(loss.dtype)
    return torch.where(m > 0, loss * m, torch.zeros_like(loss))  # (B, R)


def _token_mean(loss: Tensor, mask: Tensor, c: Counts) -> Tensor:
    return _masked(loss, mask).sum() / max(c.tokens, 1.0)


def _seq_mean_token_mean(loss: Tensor, mask: Tensor, c: Counts) -> Tensor:
    n = mask.to(loss.dtype).sum(-1).clamp(min=1.0)  # (B,) this row's own token count
    return (_masked(loss, mask).sum(-1) / n).sum() / max(c.seqs, 1.0)


def _seq_mean_token_sum(loss: Tensor, mask: Tensor, c: Counts) -> Tensor:
    return _masked(loss, mask).sum() / max(c.seqs, 1.0)


def _sum_over_constant(loss: Tensor, mask: Tensor, c: Counts) -> Tensor:
    return _masked(loss, mask).sum() / (max(c.seqs, 1.0) * c.constant)


REDUCTIONS: dict[str, Callable[[Tensor, Tensor, Counts], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "sum_over_constant": _sum_over_constant,
}


@dataclass(frozen=True)
class GlobalReducer:
    """A `guidedrl.core.types.Reducer` bound to the counts of one optimizer batch."""

    name: str
    counts: Counts

    def tokens(self, loss: Tensor, mask: Tensor) -> Tensor:
        """loss, mask (B, R) of one micro-batch -> its share of the batch loss (scalar)."""
        return REDUCTIONS[self.name](loss, mask, self.counts)

    def seqs(self, loss: Tensor) -> Tensor:
        """loss (B,) per-sequence losses of one micro-batch -> sum / global sequence count."""
        assert loss.dim() == 1, f"seqs() takes a (B,) loss, got {tuple(loss.shape)}"
        return loss.sum() / max(self.counts.seqs, 1.0)


def count(mask: Tensor, constant: float = 1.0) -> Counts:
    """Global token and sequence counts of a (B, R) mask (one all-reduce)."""
    m = mask.detach().to(torch.float64)
    totals = dist.global_sum(torch.stack([m.sum(), (m.sum(-1) > 0).sum().to(torch.float64)]))  # (2,)
    return Counts(tokens=float(totals[0]), seqs=float(totals[1]), constant=float(constant))


def build_reducer(cfg: ReduceConfig, mask: Tensor, default_constant: float) -> GlobalReducer:
    """Bind `cfg.name` to the counts of `mask`, the (B, R) loss mask of the WHOLE optimizer batch.

    default_constant: the sum_over_constant divisor when cfg.constant is None (rollout.max_new_tokens).
    """
    constant = cfg.constant if cfg.constant is not None else default_constant  # > 0: checked when the config loads
    return GlobalReducer(name=cfg.name, counts=count(mask, constant))
