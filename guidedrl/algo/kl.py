"""Per-token KL(pi_theta || pi_ref) estimators from sampled tokens (Schulman, "Approximating KL
Divergence", 2020, http://joschu.net/blog/kl-approx.html).

With log-ratio x = log pi_ref(y_t) - log pi_theta(y_t) and y_t ~ pi_theta:
- k1 = -x                      unbiased, high variance, can be negative
- k2 = x^2 / 2                 biased, low variance, always >= 0
- k3 = exp(x) - x - 1          unbiased, low variance, always >= 0 (verl's `low_var_kl`)

Departure, deliberately the same as verl's low_var_kl: for k3 the log-ratio is clamped to
[-20, 20] before exp and the result to [-10, 10], so one token with a vanishing reference
probability cannot produce inf (clamped tokens get no gradient through the clamp).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


K3_LOGRATIO_CLAMP = 20.0
"""|log pi_ref - log pi_theta| is clamped to this before exp (verl low_var_kl)."""
K3_VALUE_CLAMP = 10.0
"""k3 values are clamped to [-this, this] (verl low_var_kl)."""

Estimator = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: Estimator) -> Tensor:
    """logprobs, ref_logprobs (B, R) -> per-token KL estimate (B, R). Unmasked: callers mask/reduce."""
    assert logprobs.shape == ref_logprobs.shape, f"{logprobs.shape} vs {ref_logprobs.shape}"
    x = ref_logprobs - logprobs  # (B, R) log pi_ref / pi_theta
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    assert estimator == "k3", f"unknown estimator {estimator!r} (the config allows k1, k2, k3)"
    x = x.clamp(-K3_LOGRATIO_CLAMP, K3_LOGRATIO_CLAMP)
    return (torch.exp(x) - x - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)  # (B, R)
