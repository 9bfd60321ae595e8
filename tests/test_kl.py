"""KL estimators (Schulman's k1/k2/k3) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from guidedrl.algo.kl import kl_estimate
from guidedrl.core.errors import ConfigError

T = torch.tensor


def test_k1_k2_k3_by_hand():
    # x = ref - logp. Token 0: logp -1, ref -2 -> x = -1; token 1: logp -2, ref -1 -> x = +1; token 2: x = 0
    # k1 = -x = [1, -1, 0]; k2 = x^2 / 2 = [0.5, 0.5, 0]
    # k3 = e^x - x - 1 = [e^-1 + 1 - 1, e - 1 - 1, 0] = [0.3678794, 0.7182818, 0]
    logp, ref = T([[-1.0, -2.0, -0.3]]), T([[-2.0, -1.0, -0.3]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), T([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), T([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), T([[math.exp(-1), math.e - 2, 0.0]]))


def test_k3_gradient_by_hand():
    # d k3 / d logp = d/dlogp [e^(ref - logp) - (ref - logp) - 1] = -e^(ref - logp) + 1
    # logp -1, ref -2: -e^-1 + 1 = 0.6321206
    logp = T([[-1.0]], requires_grad=True)
    kl_estimate(logp, T([[-2.0]]), "k3").sum().backward()
    assert float(logp.grad) == pytest.approx(1 - math.exp(-1))


def test_k3_is_clamped_like_verl_low_var_kl():
    # x = 30 is clamped to 20 before exp, and e^20 - 21 is clamped to 10; x = -30 -> e^-20 + 20 - 1 -> 10
    out = kl_estimate(T([[0.0, 0.0]]), T([[30.0, -30.0]]), "k3")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, T([[10.0, 10.0]]))


def test_estimators_are_nonnegative_where_they_should_be():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 8), torch.randn(4, 8)
    assert bool((kl_estimate(logp, ref, "k2") >= 0).all())
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())


def test_unknown_estimator_is_a_config_error():
    from guidedrl.core.config import load_config

    with pytest.raises(ConfigError, match="algo.kl.estimator"):
        load_config(None, ["algo.kl.estimator=k4"])
