"""Policy losses and auxiliary terms against values worked out by hand.

Most tests use one row and the seq_mean_token_sum reduction, which for one sequence is the plain
sum over counted tokens, so per-token values and gradients can be read off directly.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from guidedrl.algo.losses import (
    calibration,
    ce_loss,
    entropy_bonus,
    kl_loss,
    nft,
    pacs,
    ppo_clip,
    reinforce,
    rover,
    straight_through_clamp,
    value_loss,
)
from guidedrl.algo.reduce import REDUCTIONS, build_reducer
from guidedrl.core.config import (
    CalibrationConfig,
    NFTLoss,
    OffPolicyWeight,
    PACSLoss,
    PPOClipLoss,
    ReduceConfig,
    ReinforceLoss,
    ROVERLoss,
)
from guidedrl.core.config import load_config
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import LossInputs

T = torch.tensor


def summing(mask: torch.Tensor):
    """For a single row, seq_mean_token_sum is the plain masked sum."""
    assert mask.shape[0] == 1
    return build_reducer(ReduceConfig(name="seq_mean_token_sum"), mask, 1.0)


def row(ratios, advs, old=None, offpolicy=None, mask=None) -> LossInputs:
    """One row whose log-probs are leaves: logp = old + log(ratio)."""
    n = len(ratios)
    old_t = torch.zeros(1, n) if old is None else T([old], dtype=torch.float32)
    logp = (old_t + torch.log(T([ratios]))).detach().requires_grad_()
    return LossInputs(
        logprobs=logp, behaviour_logprobs=old_t, advantages=T([advs], dtype=torch.float32),
        mask=torch.ones(1, n) if mask is None else T([mask], dtype=torch.float32),
        offpolicy=None if offpolicy is None else T([offpolicy]),
    )


def per_token(fn, inp: LossInputs, cfg) -> list[float]:
    """Each counted token's own loss: evaluate with a one-hot mask."""
    out = []
    for t in range(inp.mask.shape[1]):
        m = torch.zeros_like(inp.mask)
        m[0, t] = 1.0
        out.append(float(fn(replace(inp, mask=m), cfg, summing(m)).loss.detach()))
    return out


def grad(fn, inp: LossInputs, cfg, red=None) -> torch.Tensor:
    loss = fn(inp, cfg, red or summing(inp.mask)).loss
    (g,) = torch.autograd.grad(loss, inp.logprobs)
    return g[0]


# ----------------------------------------------------------------------------- ppo_clip

# (A, ratio) pairs for the clip tests
CLIP_A = [1, 1, 1, 1, -1, -1, -1, -1]
CLIP_R = [1.25, 1.35, 0.75, 1.0, 1.25, 0.75, 0.9, 1.35]


def test_ppo_clip_symmetric_by_hand():
    # loss = max(-A r, -A clip(r, 0.8, 1.2)); gradient d/dlogp = -A r where not clipped, else 0
    # A=+1: r=1.25 -> -1.2 (clipped) | 1.35 -> -1.2 (clipped) | 0.75 -> -0.75 | 1.0 -> -1.0
    # A=-1: r=1.25 -> 1.25 | 0.75 -> max(0.75, 0.8) = 0.8 (clipped) | 0.9 -> 0.9 | 1.35 -> 1.35
    inp = row(CLIP_R, CLIP_A)
    cfg = PPOClipLoss(eps_low=0.2, eps_high=0.2)
    assert per_token(ppo_clip, inp, cfg) == pytest.approx([-1.2, -1.2, -0.75, -1.0, 1.25, 0.8, 0.9, 1.35])
    torch.testing.assert_close(grad(ppo_clip, inp, cfg), T([0, 0, -0.75, -1.0, 1.25, 0, 0.9, 1.35]))
    out = ppo_clip(inp, cfg, summing(inp.mask))
    assert out.metrics["clipfrac"] == pytest.approx(3 / 8)


def test_clip_higher_changes_exactly_the_positive_tokens_above_one_plus_eps_low():
    # eps_high 0.28: A=+1, r=1.25 is now inside [0.8, 1.28]: -1.25 with gradient -1.25;
    # A=+1, r=1.35 is clipped at 1.28 instead of 1.2: -1.28. Every other token is unchanged.
    inp = row(CLIP_R, CLIP_A)
    sym = per_token(ppo_clip, inp, PPOClipLoss(eps_low=0.2, eps_high=0.2))
    hi = per_token(ppo_clip, inp, PPOClipLoss(eps_low=0.2, eps_high=0.28))
    changed = [i for i, (a, b) in enumerate(zip(sym, hi)) if abs(a - b) > 1e-7]
    assert changed == [0, 1]
    assert hi[:2] == pytest.approx([-1.25, -1.28])
    torch.testing.assert_close(
        grad(ppo_clip, inp, PPOClipLoss(eps_low=0.2, eps_high=0.28)), T([-1.25, 0, -0.75, -1.0, 1.25, 0, 0.9, 1.35])
    )


def test_dual_clip_caps_negative_advantage_tokens():
    # c = 3. A=-1, r=5: max(5, 1.2) = 5 -> capped at -A c = 3 (gradient 0)
    #        A=-1, r=2: 2 < 3 unchanged | A=-2, r=4: max(8, 2.4) = 8 -> capped at 6
    #        A=+1, r=5: -min(5, 1.2) = -1.2, the cap never applies to A > 0
    inp = row([5.0, 2.0, 4.0, 5.0], [-1, -1, -2, 1])
    cfg = PPOClipLoss(dual_clip=3.0)
    assert per_token(ppo_clip, inp, cfg) == pytest.approx([3.0, 2.0, 6.0, -1.2])
    assert per_token(ppo_clip, inp, PPOClipLoss()) == pytest.approx([5.0, 2.0, 8.0, -1.2])
    torch.testing.assert_close(grad(ppo_clip, inp, cfg), T([0.0, 2.0, 0.0, 0.0]))
    assert ppo_clip(inp, cfg, summing(inp.mask)).metrics["clipfrac_dual"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="algo.loss.dual_clip"):  # checked when the config loads
        load_config(None, ["algo.loss.dual_clip=0.5"])


def test_clip_false_is_the_plain_ratio():
    # -A r everywhere: gradient -A r
    inp = row(CLIP_R, CLIP_A)
    expected = [-a * r for a, r in zip(CLIP_A, CLIP_R)]
    assert per_token(ppo_clip, inp, PPOClipLoss(clip=False)) == pytest.approx(expected)
    torch.testing.assert_close(grad(ppo_clip, inp, PPOClipLoss(clip=False)), T(expected))


def test_masked_tokens_get_exactly_zero_gradient():
    logp = T([[-0.5, 50.0, -1e4, -0.7], [-0.2, -0.1, float("-inf"), 30.0]]).requires_grad_()
    mask = T([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    inp = LossInputs(
        logprobs=logp, behaviour_logprobs=torch.full((2, 4), -0.6), advantages=T([[1.0] * 4, [-2.0] * 4]), mask=mask,
        offpolicy=T([[False, False, False, True], [False, False, True, False]]),
    )
    for name in REDUCTIONS:
        none = PPOClipLoss(offpolicy_weight=OffPolicyWeight(kind="none"))
        for cfg in (PPOClipLoss(), PPOClipLoss(clip=False, dual_clip=3.0), none):
            loss = ppo_clip(inp, cfg, build_reducer(ReduceConfig(name=name, constant=4.0), mask, 1.0)).loss
            (g,) = torch.autograd.grad(loss, logp)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert bool((g[mask == 0] == 0).all())
            assert bool((g[mask > 0] != 0).all())


def test_offpolicy_shaped_weight_value_and_gradient():
    # teacher tokens: old_logp = 0 so w = p. p = 0.3, gamma 0.1: weight = 0.3 / 0.4 = 0.75,
    # loss = -A * 0.75 = -1.5 for A = 2; d/dlogp = -A gamma p / (p + gamma)^2 = -2 * 0.03 / 0.16 = -0.375
    # on-policy token next to it (r = 1.35, A = 2): clipped at 1.2 -> -2.4, gradient 0
    inp = row([0.3, 1.35], [2.0, 2.0], offpolicy=[True, False])
    cfg = PPOClipLoss(offpolicy_weight=OffPolicyWeight(kind="shaped", gamma=0.1))
    assert per_token(ppo_clip, inp, cfg) == pytest.approx([-1.5, -2.4])
    torch.testing.assert_close(grad(ppo_clip, inp, cfg), T([-0.375, 0.0]))
    m = ppo_clip(inp, cfg, summing(inp.mask)).metrics
    assert m["offpolicy_frac"] == 0.5 and m["offpolicy_weight_mean"] == pytest.approx(0.75)
    assert m["clipfrac"] == 1.0  # the on-policy token only


def test_offpolicy_kinds_none_and_ratio():
    # w = 1.35 on an off-policy token, A = 2. none: -A w = -2.7, unclipped (gradient -2.7).
    # ratio: clipped like on-policy: -A * 1.2 = -2.4, gradient 0.
    inp = row([1.35], [2.0], offpolicy=[True])
    assert per_token(ppo_clip, inp, PPOClipLoss(offpolicy_weight=OffPolicyWeight(kind="none"))) == pytest.approx([-2.7])
    assert per_token(ppo_clip, inp, PPOClipLoss(offpolicy_weight=OffPolicyWeight(kind="ratio"))) == pytest.approx([-2.4])
    torch.testing.assert_close(grad(ppo_clip, inp, PPOClipLoss(offpolicy_weight=OffPolicyWeight(kind="none"))), T([-2.7]))


def test_percentile_gamma_guide_grpo():
    # off-policy w = [0.1, 0.2, 0.3, 0.4, 0.5]; the 0.9 quantile (linear): position 0.9 * 4 = 3.6
    # -> 0.4 + 0.6 * (0.5 - 0.4) = 0.46. A = 1: loss = -sum w / (w + 0.46)
    # = -(0.17857 + 0.30303 + 0.39474 + 0.46512 + 0.52083) = -1.862288; plus the on-policy token
    # (ratio 1, A 1, clip off): -1. That token does not enter the quantile (if it did: 0.75).
    w = [0.1, 0.2, 0.3, 0.4, 0.5]
    inp = row(w + [1.0], [1.0] * 6, offpolicy=[True] * 5 + [False], old=[0.0] * 5 + [math.log(1 / 9.0)])
    cfg = PPOClipLoss(clip=False, offpolicy_weight=OffPolicyWeight(kind="shaped", gamma_percentile=0.9))
    out = ppo_clip(inp, cfg, summing(inp.mask))
    assert out.metrics["offpolicy_gamma"] == pytest.approx(0.46)
    expected = -sum(x / (x + 0.46) for x in w) - 1.0
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(-1.862288 - 1.0, abs=1e-6)
    # gamma is detached: the gradient is the fixed-gamma one, -A g w / (w + g)^2
    g = grad(ppo_clip, inp, cfg)
    torch.testing.assert_close(g[:5], T([-0.46 * x / (x + 0.46) ** 2 for x in w]))


def test_percentile_gamma_is_clamped_at_gamma_min():
    # all w = 1e-6 -> quantile 1e-6 < gamma_min 1e-4 -> gamma = 1e-4
    inp = row([1e-6] * 3, [1.0] * 3, offpolicy=[True] * 3)
    cfg = PPOClipLoss(offpolicy_weight=OffPolicyWeight(gamma_percentile=0.9, gamma_min=1e-4))
    assert ppo_clip(inp, cfg, summing(inp.mask)).metrics["offpolicy_gamma"] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_ppo_clip_micro_batches_equal_one_big_batch(name):
    torch.manual_seed(0)
    B, R = 7, 6
    logp = (torch.randn(B, R) * 0.3 - 1.0).requires_grad_()
    old = logp.detach() + torch.randn(B, R) * 0.3
    mask = (torch.rand(B, R) > 0.3).float()
    mask[4] = 0.0
    off = torch.zeros(B, R, dtype=torch.bool)
    off[1], off[5, :3] = True, True
    adv = torch.randn(B, 1).expand(B, R) * mask
    cfg = PPOClipLoss(eps_high=0.28, dual_clip=3.0, offpolicy_weight=OffPolicyWeight(kind="shaped", gamma=0.1))
    red = build_reducer(ReduceConfig(name=name, constant=float(R)), mask, 1.0)

    def loss(rows):
        return ppo_clip(LossInputs(logp[rows], old[rows], adv[rows], mask[rows], offpolicy=off[rows]), cfg, red).loss

    (g_full,) = torch.autograd.grad(loss(slice(0, B)), logp)
    micro = loss(slice(0, 3)) + loss(slice(3, 4)) + loss(slice(4, 7))
    (g_micro,) = torch.autograd.grad(micro, logp)
    assert abs(float(micro.detach()) - float(loss(slice(0, B)).detach())) < 1e-5
    torch.testing.assert_close(g_micro, g_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_ppo_clip_padding_columns_do_not_change_the_loss(name):
    torch.manual_seed(1)
    logp, old = torch.randn(3, 4) - 1, torch.randn(3, 4) - 1
    adv, mask = torch.randn(3, 4), T([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    pad = lambda x, v: torch.cat([x, torch.full((3, 5), v)], 1)  # noqa: E731
    cfg = PPOClipLoss()
    a = ppo_clip(LossInputs(logp, old, adv, mask), cfg, build_reducer(ReduceConfig(name=name, constant=8.0), mask, 1.0))
    wide = LossInputs(pad(logp, 3.0), pad(old, -5.0), pad(adv, 7.0), pad(mask, 0.0))
    b = ppo_clip(wide, cfg, build_reducer(ReduceConfig(name=name, constant=8.0), wide.mask, 1.0))
    assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-6)


# ----------------------------------------------------------------------------- reinforce


def test_reinforce_by_hand():
    # tokens (A=2, logp=-0.5), (A=1, logp=-2): -A logp = 1.0 + 2.0 = 3.0; tau=1 -> 1.5
    # gradient -A / (1 + tau) = [-1.0, -0.5]
    inp = row([math.exp(-0.5), math.exp(-2.0)], [2.0, 1.0])
    assert reinforce(inp, ReinforceLoss(tau=1.0), summing(inp.mask)).loss.item() == pytest.approx(1.5)
    torch.testing.assert_close(grad(reinforce, inp, ReinforceLoss(tau=1.0)), T([-1.0, -0.5]))
    tm = build_reducer(ReduceConfig(name="token_mean"), inp.mask, 1.0)
    assert reinforce(inp, ReinforceLoss(tau=0.0), tm).loss.item() == pytest.approx(1.5)  # 3.0 / 2 tokens


# ----------------------------------------------------------------------------- nft


def nft_inputs(ratios, rewards, groups, mask):
    logp = torch.log(T(ratios)).requires_grad_()
    return LossInputs(
        logprobs=logp, behaviour_logprobs=torch.zeros_like(logp), advantages=torch.zeros_like(logp), mask=T(mask),
        rewards=T(rewards), group_ids=T(groups),
    )


def test_nft_two_tokens_by_hand():
    # one group: row 0 correct (R = 1.2), row 1 wrong (R = 0.5): r_q = 1/2, w_q = 1 - r_q = 0.5
    # positive: 0.5 * -log 1.2 = -0.0911608
    # negative: proxy = (1 - 0.5 * 0.5) / 0.5 = 1.5 >= 1 -> 0.5 * -log 1.5 = -0.2027326
    # token_mean over 2 tokens: (-0.0911608 - 0.2027326) / 2 = -0.1469467
    # gradients: positive 0.5 * -1 = -0.5 (then / 2); negative d(-log proxy)/dlogp = (1/proxy) r R / (1 - r)
    #            = (1/1.5) * 0.25 / 0.5 = 1/3, times 0.5 = 1/6 (then / 2)
    inp = nft_inputs([[1.2], [0.5]], [1.0, 0.0], [0, 0], [[1.0], [1.0]])
    red = build_reducer(ReduceConfig(name="token_mean"), inp.mask, 1.0)
    out = nft(inp, NFTLoss(), red)
    assert out.loss.item() == pytest.approx(-0.1469467, abs=1e-6)
    (g,) = torch.autograd.grad(out.loss, inp.logprobs)
    torch.testing.assert_close(g, T([[-0.25], [1 / 12]]))
    assert out.metrics["rhat_mean"] == pytest.approx(0.5)
    # +-1 rewards are the same labels
    assert nft(replace(inp, rewards=T([1.0, -1.0])), NFTLoss(), red).loss.item() == pytest.approx(out.loss.item())


def test_nft_straight_through_clamp_keeps_the_unclamped_gradient():
    # wrong answer with R = 1.5, r_q = 0.5: proxy = (1 - 0.75) / 0.5 = 0.5 < 1 -> forward clamped to 1,
    # loss -log 1 = 0, but the gradient is the unclamped one: -(1/1) * d proxy/dlogp = r R / (1 - r) = 1.5,
    # times w_q = 0.5 -> 0.75 (a plain clamp would give 0)
    inp = nft_inputs([[1.0], [1.5]], [1.0, 0.0], [0, 0], [[0.0], [1.0]])
    out = nft(inp, NFTLoss(), summing_rows(inp.mask))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    (g,) = torch.autograd.grad(out.loss, inp.logprobs)
    assert float(g[1, 0]) == pytest.approx(0.75)
    assert out.metrics["neg_clamped_frac"] == 1.0
    x = T([0.5, 2.0], requires_grad=True)
    y = straight_through_clamp(x, 1.0)
    y.sum().backward()
    assert y.tolist() == [1.0, 2.0] and x.grad.tolist() == [1.0, 1.0]


def summing_rows(mask):
    """Sum over counted tokens divided by the number of sequences with tokens (here 1)."""
    return build_reducer(ReduceConfig(name="seq_mean_token_sum"), mask, 1.0)


def test_nft_normalize_and_neg_weight():
    # r_q = 1/4 (1 of 4 correct). Only row 0 counted, R = 1.2: loss = w_q * -log 1.2
    # normalize 1: w = 0.75; 2: sqrt(0.75 / 0.25) = sqrt(3); 0: 1
    inp = nft_inputs([[1.2], [1.0], [1.0], [1.0]], [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], [[1.0], [0.0], [0.0], [0.0]])
    red = summing_rows(inp.mask)
    for norm, w in [(1, 0.75), (2, math.sqrt(3)), (0, 1.0)]:
        assert nft(inp, NFTLoss(normalize=norm), red).loss.item() == pytest.approx(-w * math.log(1.2), abs=1e-6)
    # neg_weight 0 (RFT) drops negatives: a negative-only row gives 0
    neg = nft_inputs([[1.0], [0.5]], [1.0, 0.0], [0, 0], [[0.0], [1.0]])
    assert nft(neg, NFTLoss(neg_weight=0.0), summing_rows(neg.mask)).loss.item() == 0.0
    with pytest.raises(ConfigError, match="algo.loss.neg_weight"):
        load_config(None, ["algo.loss={name: nft, neg_weight: -1.0}"])


def test_nft_all_equal_group_is_clamped_not_nan():
    # all wrong: r_q = 0 -> clamped to 0.02; proxy = (1 - 0.02 * 0.5) / 0.98 = 1.0102; finite
    inp = nft_inputs([[0.5], [0.5]], [0.0, 0.0], [0, 0], [[1.0], [1.0]])
    loss = nft(inp, NFTLoss(), summing_rows(inp.mask)).loss
    expected = 2 * 0.98 * -math.log((1 - 0.02 * 0.5) / 0.98) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- pacs


def test_pacs_by_hand():
    # one group of 3, labels [1, 0, 0], one token each, beta = 1: scores s = [0.3, -0.1, 0.2]
    # psi = s_i - mean of the others: 0.3 - 0.05 = 0.25; -0.1 - 0.25 = -0.35; 0.2 - 0.1 = 0.1
    # balanced weights n / (2 n_class): positive 3/2 = 1.5; negatives 3/4 = 0.75
    # loss = (1.5 softplus(-0.25) + 0.75 softplus(-0.35) + 0.75 softplus(0.1)) / 3 sequences
    logp = T([[0.3], [-0.1], [0.2]]).requires_grad_()
    inp = LossInputs(logp, torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(3, 1), rewards=T([1.0, 0.0, 0.0]),
                     group_ids=T([5, 5, 5]))
    red = build_reducer(ReduceConfig(), inp.mask, 1.0)
    out = pacs(inp, PACSLoss(), red)
    sp = F.softplus
    expected = (1.5 * sp(T(-0.25)) + 0.75 * sp(T(-0.35)) + 0.75 * sp(T(0.1))) / 3
    assert out.loss.item() == pytest.approx(float(expected), abs=1e-6)
    # gradient flows through the baseline: g_i = w_i (sigmoid(psi_i) - y_i) / 3
    # dL/ds_0 = g_0 - g_1/2 - g_2/2 (s_0 sits in the baselines of rows 1 and 2)
    gi = [w * (torch.sigmoid(T(p)) - y) / 3 for w, p, y in [(1.5, 0.25, 1), (0.75, -0.35, 0), (0.75, 0.1, 0)]]
    (g,) = torch.autograd.grad(out.loss, logp)
    assert float(g[0, 0]) == pytest.approx(float(gi[0] - gi[1] / 2 - gi[2] / 2), abs=1e-6)
    unbalanced = (sp(T(-0.25)) + sp(T(-0.35)) + sp(T(0.1))) / 3
    assert pacs(inp, PACSLoss(balanced=False), red).loss.item() == pytest.approx(float(unbalanced), abs=1e-6)


def test_pacs_beta_masking_and_inactive_rows():
    # beta 2, row 0 has tokens [0.1, (9.0 masked)] -> s_0 = 2 * 0.1 = 0.2; row 1 s = 2 * -0.1 = -0.2
    # row 2 is fully masked: no baseline member, no loss. psi = +-0.4, labels [1, 0], balanced 1 each
    # loss = (softplus(-0.4) + softplus(-0.4)) / 2 sequences
    logp = T([[0.1, 9.0], [-0.1, 0.0], [5.0, 5.0]])
    inp = LossInputs(logp, torch.zeros(3, 2), torch.zeros(3, 2), T([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
                     rewards=T([1.0, 0.0, 1.0]), group_ids=T([0, 0, 0]))
    out = pacs(inp, PACSLoss(beta=2.0), build_reducer(ReduceConfig(), inp.mask, 1.0))
    assert out.loss.item() == pytest.approx(float(F.softplus(T(-0.4))), abs=1e-6)


# ----------------------------------------------------------------------------- rover


def test_rover_by_hand():
    # rho 1, Q = logp - old = [0.1, -0.2, 0.3]; V = vocab-mean difference = [x, 0.05, -0.04]
    # V_{t+1} = [0.05, -0.04, 0 (after the last token)]; A = 0.5: target = [0.55, 0.46, 0.5]
    # squared errors [0.2025, 0.4356, 0.04], token mean 0.6781 / 3 = 0.2260333
    # gradient 2 (Q - target) / 3 = [-0.3, -0.44, -0.13333]
    logp = T([[0.1, -0.2, 0.3]]).requires_grad_()
    vm = T([[7.0, 0.05, -0.04]]).requires_grad_()
    inp = LossInputs(logp, torch.zeros(1, 3), torch.full((1, 3), 0.5), torch.ones(1, 3),
                     vocab_mean_logprobs=vm, behaviour_vocab_mean=torch.zeros(1, 3))
    out = rover(inp, ROVERLoss(), build_reducer(ReduceConfig(), inp.mask, 1.0))
    assert out.loss.item() == pytest.approx(0.2260333, abs=1e-6)
    g_logp, g_vm = torch.autograd.grad(out.loss, [logp, vm], allow_unused=True)
    torch.testing.assert_close(g_logp, T([[-0.3, -0.44, -0.4 / 3]]))
    assert g_vm is None or bool((g_vm == 0).all())  # the target is stop-gradient
    # next_q_scale 0 drops V: target 0.5 everywhere -> ((0.4)^2 + (0.7)^2 + (0.2)^2) / 3 = 0.23
    assert rover(inp, ROVERLoss(next_q_scale=0.0), build_reducer(ReduceConfig(), inp.mask, 1.0)).loss.item() == \
        pytest.approx(0.23, abs=1e-6)


def test_rover_needs_vocab_means():
    from guidedrl.algo.terms import LOSSES

    assert LOSSES["rover"].needs.vocab_mean  # the update computes them for this loss (and only it)
    assert not any(t.needs.vocab_mean for name, t in LOSSES.items() if name != "rover")
    inp = row([1.0], [1.0])
    with pytest.raises(AssertionError, match="vocab_mean"):
        rover(inp, ROVERLoss(), summing(inp.mask))


# ----------------------------------------------------------------------------- auxiliary terms


def test_value_loss_by_hand():
    # token 0: V=1, old=0, R=1: unclipped (V-R)^2 = 0; clipped V = 0 + clip(1, -.2, .2) = 0.2 -> 0.64 -> 0.64
    # token 1: V=-0.5, old=0, R=1: unclipped 2.25; clipped V = -0.2 -> 1.44 -> max 2.25
    # 0.5 * token mean = 0.5 * (0.64 + 2.25) / 2 = 0.7225; without clip 0.5 * (0 + 2.25) / 2 = 0.5625
    v = T([[1.0, -0.5]], requires_grad=True)
    mask = torch.ones(1, 2)
    red = build_reducer(ReduceConfig(), mask, 1.0)
    out = value_loss(v, torch.zeros(1, 2), torch.ones(1, 2), mask, 0.2, red)
    assert out.loss.item() == pytest.approx(0.7225)
    assert out.metrics["vf_clipfrac"] == 0.5
    (g,) = torch.autograd.grad(out.loss, v)
    torch.testing.assert_close(g, T([[0.0, 0.5 * 2 * (-1.5) / 2]]))  # clipped token gets no gradient
    assert value_loss(v, torch.zeros(1, 2), torch.ones(1, 2), mask, None, red).loss.item() == pytest.approx(0.5625)


def test_calibration_by_hand():
    # row 0: reward 1 > 0.1 -> s = +1, A = 0.5. tokens logp [-1.0, -0.2] vs expert [-0.5, -0.5]:
    #   d = [-0.5, 0.3]; -s d = [0.5, -0.3]; LeakyReLU(0.5) -> [0.5, -0.15]; times |A| -> [0.25, -0.075]
    # row 1: reward 0 -> s = -1, A = -0.5. logp [-1.0, x] vs expert [-2.0, x]: d = 1, -s d = 1 -> 0.5 * 1 = 0.5
    #   its second token is off-policy (excluded)
    # sum over counted on-policy tokens / 2 sequences = (0.25 - 0.075 + 0.5) / 2 = 0.3375
    logp = T([[-1.0, -0.2], [-1.0, -3.0]]).requires_grad_()
    inp = LossInputs(logp, torch.zeros(2, 2), T([[0.5, 0.5], [-0.5, -0.5]]), torch.ones(2, 2),
                     offpolicy=T([[False, False], [False, True]]), rewards=T([1.0, 0.0]))
    red = build_reducer(ReduceConfig(name="seq_mean_token_sum"), inp.mask, 1.0)
    out = calibration(inp, CalibrationConfig(), T([[-0.5, -0.5], [-2.0, -9.0]]), red)
    assert out.loss.item() == pytest.approx(0.3375)
    # gradients: row 0 token 0: |A| * -1 = -0.5 (/2); token 1 (leaky side): |A| * 0.5 * -1 = -0.25 (/2)
    # row 1 token 0: |A| * -s = 0.5 * +1 -> +0.5 (/2), pushing the wrong answer down
    (g,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(g, T([[-0.25, -0.125], [0.25, 0.0]]))


def test_entropy_ce_and_kl_terms():
    mask = T([[1.0, 1.0, 0.0]])
    red = build_reducer(ReduceConfig(), mask, 1.0)
    # entropy token mean (0.5 + 1.5) / 2 = 1.0; CE = -mean(logp) = (0.2 + 0.4) / 2 = 0.3
    assert entropy_bonus(T([[0.5, 1.5, 99.0]]), mask, red).loss.item() == pytest.approx(1.0)
    assert ce_loss(T([[-0.2, -0.4, -50.0]]), mask, red).loss.item() == pytest.approx(0.3)
    # k1 with logp [-1, -2], ref [-2, -1]: [1, -1] -> mean 0; k2: [0.5, 0.5] -> 0.5
    logp, ref = T([[-1.0, -2.0, 0.0]]), T([[-2.0, -1.0, 0.0]])
    assert kl_loss(logp, ref, mask, "k1", red).loss.item() == pytest.approx(0.0)
    assert kl_loss(logp, ref, mask, "k2", red).loss.item() == pytest.approx(0.5)
