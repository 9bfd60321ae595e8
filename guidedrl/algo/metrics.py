"""Evaluation: unbiased pass@k, mean@k and majority@k, overall and per difficulty level.

Every `@k` number is the expected value of a k-sample evaluation, estimated from `n >= k`
samples per problem and averaged over problems:

- pass@k: the chance that at least one of k samples is correct. The unbiased estimator of Chen et
  al. 2021 ("Evaluating Large Language Models Trained on Code", the Codex paper, eq. 1):
  1 - C(n-c, k) / C(n, k), computed in their numerically stable product form.
- mean@k: the expected share of correct samples among k. Its expectation does not depend on k,
  so the unbiased, lowest-variance estimate is c / n for every k (reported per k for symmetry).
- majority@k: the chance that the most common answer among k samples is correct (self-consistency,
  Wang et al. 2022), ties broken uniformly at random. Estimated by averaging over every k-subset of
  the n samples when there are at most `max_subsets` of them, else over that many uniform random
  k-subsets (seeded; still unbiased, no longer exact).

A completion is *correct* when its reward is >= `threshold` (default 1 - 1e-6, so partial-credit
rewards count only at full marks). A reward of None (not applicable) counts as 0 and incorrect.
Answers for majority voting are `info["answer"]` from the reward when present, else the stripped
completion text. Problems without a level count only in the overall numbers.

Departures from the papers: none in the estimators; majority@k over more than `max_subsets`
subsets is a Monte Carlo estimate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor


def _check_nk(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1 (samples per problem), got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}: pass@k needs at least k samples per problem")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.

    >>> pass_at_k(4, 1, 2)
    0.5
    >>> pass_at_k(5, 0, 3), pass_at_k(5, 5, 3), pass_at_k(3, 1, 3)
    (0.0, 1.0, 1.0)
    """
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_at_k(n: int, c: int, k: int) -> float:
    """Expected share of correct samples among k draws: c/n for any k <= n (unbiased).

    >>> mean_at_k(4, 1, 2)
    0.25
    """
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    return c / n


def majority_at_k(
    answers: Sequence[str], correct: Sequence[float], k: int, *, max_subsets: int = 2000, seed: int = 0
) -> float:
    """Chance that the plurality answer of k samples is correct, averaged over k-subsets.

    `correct[i]` is 1/0 (or a share) for sample i; an answer class is worth the mean correctness
    of its members, and a tie between classes is worth the mean of the tied classes (uniform tie
    break). Exact when C(n, k) <= max_subsets, else a seeded Monte Carlo average.

    >>> majority_at_k(["a", "a", "b"], [1, 1, 0], 2)  # {a,a}: 1, {a,b}: tie 0.5, {a,b}: 0.5
    0.6666666666666666
    """
    n = len(answers)
    _check_nk(n, k)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} correctness values")
    classes: dict[str, int] = {}
    ids = np.array([classes.setdefault(a, len(classes)) for a in answers])  # (n,)
    size = np.bincount(ids, minlength=len(classes)).astype(float)  # (J,)
    worth = np.bincount(ids, weights=np.asarray(correct, dtype=float), minlength=len(classes)) / size  # (J,)
    if math.comb(n, k) <= max_subsets:
        subsets = np.array(list(itertools.combinations(range(n), k)))  # (S, k) every k-subset
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k]  # (S, k) uniform k-subsets
    votes = np.zeros((len(subsets), len(classes)))  # (S, J)
    np.add.at(votes, (np.arange(len(subsets))[:, None], ids[subsets]), 1.0)
    winners = votes == votes.max(axis=1, keepdims=True)  # (S, J) the tied leaders
    value = (winners * worth).sum(axis=1) / winners.sum(axis=1)  # (S,)
    return float(value.mean())


def logprob_agreement(logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """How well the update's log-probs reproduce the rollout's on the same tokens: mean |log ratio|
    and the share of tokens whose ratio exp(logp - behaviour_logp) is outside [0.9, 1.1].

    logprobs, behaviour_logprobs, mask: (B, R); only tokens with mask > 0 count. Sampling and
    training with the same weights and arithmetic gives 0 and 0; a serving engine with other kernels
    does not (the reason stacks that sample with vLLM need importance corrections).

    >>> import torch
    >>> m = logprob_agreement(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, -1.2]]), torch.ones(1, 2))
    >>> round(m["policy/rollout_logratio_abs"], 6), m["policy/rollout_ratio_outside"]
    (0.1, 0.5)
    """
    sel = mask > 0
    n = int(sel.sum())
    if n == 0:
        return {}
    d = (logprobs.detach() - behaviour_logprobs).float()[sel]  # (n,)
    outside = (d.exp() < 0.9) | (d.exp() > 1.1)
    return {"policy/rollout_logratio_abs": float(d.abs().mean()), "policy/rollout_ratio_outside": float(outside.float().mean())}
