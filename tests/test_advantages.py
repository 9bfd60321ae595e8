"""Advantage estimators against values worked out by hand, plus properties.

Unbiased std throughout: std([1, 0]) = sqrt(((0.5)^2 + (0.5)^2) / (2 - 1)) = sqrt(0.5) = 0.70711.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidedrl import algo
from guidedrl.algo.advantages import amplified, gae, grpo, group_stats, lite_ppo, reinforce_pp, rloo
from guidedrl.core.config import (
    AmplifiedAdvantage,
    GAEAdvantage,
    GRPOAdvantage,
    LitePPOAdvantage,
    ReinforcePPAdvantage,
    RLOOAdvantage,
)
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import AdvantageInputs

T = torch.tensor


def inputs(rewards, groups, mask=None, **kw) -> AdvantageInputs:
    r = T(rewards, dtype=torch.float32)
    m = torch.ones(len(rewards), 3) if mask is None else T(mask, dtype=torch.float32)
    return AdvantageInputs(rewards=r, group_ids=T(groups), mask=m, **kw)


def seq(adv: torch.Tensor) -> torch.Tensor:
    """First column (every test row has its first token counted)."""
    return adv[:, 0]


# ----------------------------------------------------------------------------- grpo


def test_grpo_two_groups_by_hand():
    # groups {1, 0} and {0, 1}: mean 0.5, std sqrt(0.5) -> A = +-0.5/0.70711 = +-0.70711
    out = grpo(inputs([1, 0, 0, 1], [0, 0, 1, 1]), GRPOAdvantage())
    s = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(seq(out.advantages), T([s, -s, -s, s]), atol=1e-5, rtol=0)
    # broadcast to every counted token
    torch.testing.assert_close(out.advantages, seq(out.advantages)[:, None].expand(4, 3))
    assert out.returns is None


def test_grpo_without_std_is_mean_only():
    # Dr.GRPO / LUFFY: A = r - mean = +-0.5
    out = grpo(inputs([1, 0, 0, 1], [0, 0, 1, 1]), GRPOAdvantage(std=False))
    torch.testing.assert_close(seq(out.advantages), T([0.5, -0.5, -0.5, 0.5]))


def test_grpo_group_sums_zero_and_masked_tokens_zero():
    torch.manual_seed(0)
    r = torch.rand(12)
    g = T([5, 5, 5, 2, 2, 2, 2, 9, 9, 9, 9, 9])
    mask = (torch.rand(12, 6) > 0.3).float()
    mask[:, 0] = 1
    for cfg in (GRPOAdvantage(), GRPOAdvantage(std=False)):
        a = grpo(AdvantageInputs(rewards=r, group_ids=g, mask=mask), cfg).advantages
        assert bool((a[mask == 0] == 0).all())
        for gid in (5, 2, 9):
            assert abs(float(a[g == gid, 0].sum())) < 1e-5


def test_grpo_group_of_one_and_all_equal_group_give_zero_not_nan():
    # group 7 has one member: r - mean = 0 and no division; group 3 all equal: 0 / (0 + eps) = 0
    for cfg in (GRPOAdvantage(), GRPOAdvantage(std=False)):
        a = grpo(inputs([0.7, 1, 1], [7, 3, 3]), cfg).advantages
        assert torch.isfinite(a).all()
        assert bool((a == 0).all())


def test_grpo_stats_from_onpolicy():
    # one group of 4: row 0 is off-policy (a teacher trace), rewards [1, 1, 0, 0]
    # on-policy rows [1, 0, 0]: mean 1/3, std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735
    # no std: A = r - 1/3 = [2/3, 2/3, -1/3, -1/3]   (stats over all rows would give mean 0.5)
    onp = T([False, True, True, True])
    inp = inputs([1, 1, 0, 0], [0, 0, 0, 0], onpolicy=onp)
    a = grpo(inp, GRPOAdvantage(std=False, stats_from="onpolicy")).advantages
    torch.testing.assert_close(seq(a), T([2 / 3, 2 / 3, -1 / 3, -1 / 3]))
    a = grpo(inp, GRPOAdvantage(std=True, stats_from="onpolicy", eps=0.0)).advantages
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(seq(a), T([2 / 3 / s, 2 / 3 / s, -1 / 3 / s, -1 / 3 / s]))


def test_grpo_stats_from_onpolicy_falls_back_to_all_rows_without_onpolicy_members():
    # group 1 is entirely off-policy: its own mean 0.5 is used -> [0.5, -0.5]
    inp = inputs([1, 0, 1, 0], [0, 0, 1, 1], onpolicy=T([True, True, False, False]))
    a = grpo(inp, GRPOAdvantage(std=False, stats_from="onpolicy")).advantages
    torch.testing.assert_close(seq(a), T([0.5, -0.5, 0.5, -0.5]))


# ----------------------------------------------------------------------------- rloo


def test_rloo_by_hand_and_group_sums():
    # pairs: 1 - 0 = 1, 0 - 1 = -1. Triple [1, 0, 0]: 1 - 0 = 1, 0 - 0.5 = -0.5, -0.5. Single: 0.
    a = seq(rloo(inputs([1, 0, 0, 1, 1, 0, 0, 0.3], [0, 0, 1, 1, 2, 2, 2, 3]), RLOOAdvantage()).advantages)
    torch.testing.assert_close(a, T([1, -1, -1, 1, 1, -0.5, -0.5, 0]))
    assert abs(float(a[4:7].sum())) < 1e-6


# ----------------------------------------------------------------------------- reinforce++


def test_reinforce_pp_whitens_over_global_tokens():
    # rewards [1, 0], row 0 has 3 counted tokens, row 1 has 1: token values [1, 1, 1, 0]
    # mean 0.75; unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25 -> std 0.5
    # A row 0 = 0.25 / 0.5 = 0.5; row 1 = -0.75 / 0.5 = -1.5
    inp = inputs([1, 0], [0, 1], mask=[[1, 1, 1], [1, 0, 0]])
    a = reinforce_pp(inp, ReinforcePPAdvantage(eps=0.0)).advantages
    torch.testing.assert_close(a, T([[0.5, 0.5, 0.5], [-1.5, 0, 0]]))


def test_reinforce_pp_group_baseline():
    # [1, 0 | 0, 1] minus group means -> [0.5, -0.5, -0.5, 0.5]; one token each:
    # mean 0, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.86603
    inp = inputs([1, 0, 0, 1], [0, 0, 1, 1], mask=[[1, 0, 0]] * 4)
    a = seq(reinforce_pp(inp, ReinforcePPAdvantage(group_baseline=True, eps=0.0)).advantages)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a, T([s, -s, -s, s]))


# ----------------------------------------------------------------------------- lite ppo


def test_lite_ppo_divides_by_batch_std_of_raw_rewards():
    # rewards [1, 0 | 1, 1]: raw batch mean 0.75, unbiased std sqrt((3*0.0625 + 0.5625)/3) = 0.5
    # group means 0.5 and 1 -> A = [0.5/0.5, -0.5/0.5, 0, 0] = [1, -1, 0, 0]
    # (the std of the centred residuals [.5, -.5, 0, 0] would be 0.40825 -> 1.2247; GRPO gives 0.70711)
    inp = inputs([1, 0, 1, 1], [0, 0, 1, 1])
    a = seq(lite_ppo(inp, LitePPOAdvantage(eps=0.0)).advantages)
    torch.testing.assert_close(a, T([1.0, -1.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- amplified (R3L)


def test_amplified_by_hand():
    # one group [1, 0.5, 0, 0.2]: b = 1.7 / 4 = 0.425
    # r=1 >= success -> 1; r=0.5: d=0.075 >= 0 -> 3*0.075 = 0.225; r=0: -0.425; r=0.2: -0.225
    a = seq(amplified(inputs([1, 0.5, 0, 0.2], [4, 4, 4, 4]), AmplifiedAdvantage()).advantages)
    torch.testing.assert_close(a, T([1.0, 0.225, -0.425, -0.225]))


# ----------------------------------------------------------------------------- gae


def gae_inputs(values, rewards, mask, token_rewards=None) -> AdvantageInputs:
    return AdvantageInputs(
        rewards=T(rewards), group_ids=torch.arange(len(rewards)), mask=T(mask), values=T(values),
        token_rewards=None if token_rewards is None else T(token_rewards),
    )


def test_gae_three_tokens_by_hand():
    # V = [0.5, 0.6, 0.7], reward 1 on the last token, gamma 1, lam 0.5
    # t=2: delta = 1 + 0 - 0.7 = 0.3               A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1             A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1             A0 = 0.1 + 0.5 * 0.25 = 0.225
    # returns = A + V = [0.725, 0.85, 1.0]
    out = gae(gae_inputs([[0.5, 0.6, 0.7]], [1.0], [[1, 1, 1]]), GAEAdvantage(gamma=1.0, lam=0.5, whiten=False))
    torch.testing.assert_close(out.advantages, T([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(out.returns, T([[0.725, 0.85, 1.0]]))


def test_gae_lambda_one_returns_are_discounted_returns():
    # gamma 0.5, lam 1: delta2 = 1 - 0.7 = 0.3; delta1 = 0.5*0.7 - 0.6 = -0.25; delta0 = 0.5*0.6 - 0.5 = -0.2
    # A2 = 0.3; A1 = -0.25 + 0.5*0.3 = -0.1; A0 = -0.2 + 0.5*(-0.1) = -0.25
    # returns = [0.25, 0.5, 1.0] = 0.5^2, 0.5^1, 0.5^0 times the final reward
    out = gae(gae_inputs([[0.5, 0.6, 0.7]], [1.0], [[1, 1, 1]]), GAEAdvantage(gamma=0.5, lam=1.0, whiten=False))
    torch.testing.assert_close(out.advantages, T([[-0.25, -0.1, 0.3]]))
    torch.testing.assert_close(out.returns, T([[0.25, 0.5, 1.0]]))


def test_gae_skips_masked_tokens_and_uses_last_counted_token():
    # row 0: mask [1, 0, 1]: the middle token is skipped. t=2: A2 = 1 - 0.7 = 0.3 (V carried = 0.7)
    #        t=0: delta = 0 + 0.7 - 0.5 = 0.2, A0 = 0.2 + 0.5*0.3 = 0.35
    # row 1: right padding, mask [1, 1, 0]: reward sits on token 1. t=1: A1 = 1 - 0.6 = 0.4
    #        t=0: delta = 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.5*0.4 = 0.3
    vals = [[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]]
    out = gae(gae_inputs(vals, [1.0, 1.0], [[1, 0, 1], [1, 1, 0]]), GAEAdvantage(gamma=1.0, lam=0.5, whiten=False))
    torch.testing.assert_close(out.advantages, T([[0.35, 0.0, 0.3], [0.3, 0.4, 0.0]]))
    torch.testing.assert_close(out.returns, T([[0.85, 0.0, 1.0], [0.8, 1.0, 0.0]]))


def test_gae_adds_token_rewards():
    # V = 0, gamma = lam = 1: A_t = reward-to-go. Token rewards -0.1 each, final reward 1:
    # A2 = 1 - 0.1 = 0.9, A1 = 0.8, A0 = 0.7
    out = gae(gae_inputs([[0.0, 0.0, 0.0]], [1.0], [[1, 1, 1]], [[-0.1, -0.1, -0.1]]),
              GAEAdvantage(gamma=1.0, lam=1.0, whiten=False))
    torch.testing.assert_close(out.advantages, T([[0.7, 0.8, 0.9]]))


def test_gae_whitening_over_counted_tokens():
    torch.manual_seed(1)
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    inp = AdvantageInputs(rewards=T([1.0, 0.0, 0.5]), group_ids=T([0, 1, 2]), mask=mask, values=torch.rand(3, 4))
    raw = gae(inp, GAEAdvantage(whiten=False))
    white = gae(inp, GAEAdvantage(whiten=True))
    sel = mask > 0
    assert abs(float(white.advantages[sel].mean())) < 1e-5
    assert abs(float(white.advantages[sel].std()) - 1.0) < 1e-4  # unbiased, like torch.std
    assert bool((white.advantages[~sel] == 0).all())
    torch.testing.assert_close(white.returns, raw.returns)  # returns come from un-whitened advantages


# ----------------------------------------------------------------------------- helpers and registry


def loop_group_stats(values, groups, counted):
    """The plain-python reference (verl keeps a loop version for exactly this check)."""
    out_m, out_s, out_n = [], [], []
    for i in range(len(values)):
        members = [values[j] for j in range(len(values)) if groups[j] == groups[i] and counted[j]]
        n = len(members)
        mean = sum(members) / n if n else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)) if n >= 2 else 0.0
        out_m.append(mean), out_s.append(std), out_n.append(float(n))
    return out_m, out_s, out_n


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.sampled_from([3, 11, 40, 7]), st.booleans()), min_size=1, max_size=20))
def test_group_stats_matches_python_loop(rows):
    vals, groups, counted = zip(*rows)
    m, s, n = group_stats(T(vals, dtype=torch.float64), T(groups), T(counted))
    em, es, en = loop_group_stats(vals, groups, counted)
    torch.testing.assert_close(m, T(em, dtype=torch.float64))
    torch.testing.assert_close(s, T(es, dtype=torch.float64))
    torch.testing.assert_close(n, T(en, dtype=torch.float64))


def test_group_stats_is_differentiable():
    v = T([1.0, 2.0, 4.0], requires_grad=True)
    m, _, _ = group_stats(v, T([0, 0, 1]))
    m.sum().backward()
    # rows 0, 1 each receive mean(v0, v1): d/dv0 = 2 * 0.5 = 1; row 2 receives v2: 1
    torch.testing.assert_close(v.grad, T([1.0, 1.0, 1.0]))


def test_registry_lookup_and_error():
    assert algo.get(algo.ADVANTAGES, "grpo") is grpo
    with pytest.raises(ConfigError, match=r"algo.advantage.name.*valid: amplified, gae, grpo"):
        algo.get(algo.ADVANTAGES, "gpro", "algo.advantage.name")
    with pytest.raises(ConfigError, match="ppo_clip"):
        algo.get(algo.LOSSES, "ppo", "algo.loss.name")


def test_every_configured_name_is_registered():
    from typing import get_args

    from guidedrl.core.config import AdvantageConfig, LossConfig

    adv_names = {c.model_fields["name"].default for c in get_args(get_args(AdvantageConfig)[0])}
    loss_names = {c.model_fields["name"].default for c in get_args(get_args(LossConfig)[0])}
    assert adv_names == set(algo.ADVANTAGES)
    assert loss_names == set(algo.LOSSES)
