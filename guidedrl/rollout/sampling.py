"""Sampling from logits, shared by both decode paths: top-k / top-p filtering, inverse-CDF draws
from pre-drawn uniforms (so dropping rows or switching decode paths changes no row's tokens), and
one sampling step with its behaviour log-probs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits: (B, V) already temperature-scaled -> masked logits for sampling."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def inverse_cdf_sample(probs: Tensor, u: Tensor) -> Tensor:
    """A sample from each row of probs (B, V) (unnormalized is fine) given u (B, 1) ~ U(0, 1] -> (B,).

    Token k is picked when cum[k-1] < u * cum[-1] <= cum[k], which has probability p_k / sum(p); a
    zero-probability token (cum[k] == cum[k-1]) is never picked, and u > 0 keeps the count <= V - 1.
    """
    cum = probs.cumsum(-1)  # (B, V)
    return (cum < u * cum[:, -1:]).sum(-1)  # (B,) number of tokens whose cumulative mass is below the draw


def sample_tokens(
    logits: Tensor,
    bias: Tensor,
    u: Tensor,
    done: Tensor,
    eos: Tensor,
    pad: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    filter_fn: Callable[[Tensor, int, float], Tensor],
) -> tuple[Tensor, Tensor]:
    """One sampling step on the device. logits (B, V) -> (next ids (B,), behaviour log-probs (B,)).

    Updates `done` (B,) in place: rows that sampled eos are done; done rows emit pad with log-prob 0.
    """
    scaled = logits.float() / temperature + bias  # (B, V)
    logp = scaled.log_softmax(-1)  # (B, V) the recorded behaviour distribution (no top-k/p renormalization)
    probs = filter_fn(scaled, top_k, top_p).softmax(-1)
    nxt = inverse_cdf_sample(probs, u)  # (B,)
    nxt = torch.where(done, pad, nxt)
    lp = logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(done, 0.0)  # (B,)
    done |= torch.isin(nxt, eos)
    return nxt, lp
