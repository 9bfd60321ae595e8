"""Policy losses and auxiliary terms as pure tensor functions.

Policy losses share one signature, `fn(inp: LossInputs, cfg, reduce: Reducer) -> LossOutputs`;
the reduction (token mean, sequence mean, sum over a constant) is the caller's `reduce`, bound with
global normalizers (see `guidedrl.algo.reduce`). Auxiliary terms (value, calibration, entropy,
cross-entropy, KL) take explicit tensors. Metrics are plain floats named as in the papers
(`clipfrac`, `approx_kl`, `ratio_mean`), computed over this micro-batch.

Numerical guards shared by every loss: log-ratios are clamped to [-20, 20] before exp (as verl
does), so a garbage log-prob on a padded token cannot produce inf; reductions zero masked tokens
with `where`, so masked tokens get exactly zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from guidedrl.algo.advantages import group_stats
from guidedrl.algo.kl import Estimator, kl_estimate
from guidedrl.core.config import (
    CalibrationConfig,
    NFTLoss,
    OffPolicyWeight,
    PACSLoss,
    PPOClipLoss,
    ReinforceLoss,
    ROVERLoss,
)
from guidedrl.core.types import LossInputs, LossOutputs, Reducer

LOGRATIO_CLAMP = 20.0
"""|log pi_theta - log pi_old| is clamped to this before exp (verl's ratio guard)."""
NFT_NEG_CLAMP_MIN = 1.0
"""NFT's clamp_negative: the implicit-negative proxy is straight-through clamped at this minimum."""


def _mean(x: Tensor, sel: Tensor) -> float:
    """Mean of x over the True entries of sel (0.0 if none): a local metric, no gradient."""
    s = sel.to(torch.float32)
    n = float(s.sum())
    return float((x.detach().to(torch.float32) * s).sum()) / n if n > 0 else 0.0


def _ratio(inp: LossInputs) -> tuple[Tensor, Tensor]:
    """-> (log-ratio, ratio), both (B, R), log-ratio clamped to +-LOGRATIO_CLAMP."""
    assert inp.logprobs.shape == inp.behaviour_logprobs.shape == inp.mask.shape, (
        f"logprobs {tuple(inp.logprobs.shape)}, behaviour {tuple(inp.behaviour_logprobs.shape)}, mask {tuple(inp.mask.shape)}"
    )
    logratio = (inp.logprobs - inp.behaviour_logprobs).clamp(-LOGRATIO_CLAMP, LOGRATIO_CLAMP)  # (B, R)
    return logratio, logratio.exp()


def _approx_kl(logratio: Tensor, ratio: Tensor, sel: Tensor) -> float:
    """KL(pi_old || pi_theta) by the k3 estimator (r - 1) - log r, as cleanrl's `approx_kl`."""
    return _mean((ratio - 1.0) - logratio, sel)


# ----------------------------------------------------------------------------- PPO clip


def shaped_gamma(w: Tensor, sel: Tensor, cfg: OffPolicyWeight) -> Tensor:
    """gamma of the shaped weight w/(w+gamma): cfg.gamma, or (Guide-GRPO) the detached
    cfg.gamma_percentile quantile of w over the selected tokens, clamped below at cfg.gamma_min."""
    if cfg.gamma_percentile is None or not bool(sel.any()):
        return w.new_tensor(cfg.gamma)
    q = torch.quantile(w.detach()[sel].to(torch.float32), cfg.gamma_percentile)  # linear interpolation
    return q.clamp(min=cfg.gamma_min).to(w.dtype)


def _clipped(ratio: Tensor, adv: Tensor, cfg: PPOClipLoss) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO loss -> (loss, clipped, dual_capped), each (B, R)."""
    pg1 = -adv * ratio  # (B, R)
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if not cfg.clip:
        return pg1, none, none
    pg2 = -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)  # (B, R)
    loss = torch.maximum(pg1, pg2)  # = -min(rA, clip(r)A)
    clipped = pg2 > pg1
    if cfg.dual_clip is None:
        return loss, clipped, none
    pg3 = -adv * cfg.dual_clip  # (B, R) cap for A < 0 (verl: min(pg_losses3, clip_pg_losses1))
    capped = (adv < 0) & (loss > pg3)
    return torch.where(adv < 0, torch.minimum(loss, pg3), loss), clipped, capped


def ppo_clip(inp: LossInputs, cfg: PPOClipLoss, reduce: Reducer) -> LossOutputs:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347) with the field's variants.

    On-policy tokens: -min(r A, clip(r, 1-eps_low, 1+eps_high) A), r = exp(logp - behaviour_logp);
    eps_high > eps_low is DAPO's clip-higher; dual_clip c caps negative-advantage tokens at -A c
    (Ye et al. 2020, verl); clip=False gives -A r (LUFFY, Critique-GRPO "loss_remove_clip").
    Tokens flagged `offpolicy` take cfg.offpolicy_weight:
    - shaped: -A w/(w+gamma), w = exp(logp - behaviour_logp), unclipped. behaviour_logp = 0 for teacher text
      makes w = p: LUFFY/AMPO (gamma 0.1), HeRL (gamma 1). With a behaviour log-prob under a hinted
      context, w is Guide-GRPO's cross-context ratio; gamma_percentile=0.9 is its per-micro-batch
      percentile gamma (so that gamma, unlike everything else, depends on the micro-batching).
    - ratio: clipped exactly like on-policy tokens.  - none: -A w, unclipped.
    Metrics over on-policy counted tokens: clipfrac, clipfrac_dual, approx_kl (k3), ratio_mean;
    offpolicy_frac is the share of counted tokens that are off-policy.
    """
    mask = inp.mask > 0  # (B, R)
    logratio, ratio = _ratio(inp)
    adv = inp.advantages  # (B, R)
    loss, clipped, capped = _clipped(ratio, adv, cfg)
    off = torch.zeros_like(mask)
    if inp.offpolicy is not None and cfg.offpolicy_weight.kind != "ratio":
        off = inp.offpolicy.bool() & mask  # (B, R)
    metrics: dict[str, float] = {"offpolicy_frac": _mean(off.float(), mask)}
    if bool(off.any()):
        if cfg.offpolicy_weight.kind == "shaped":
            gamma = shaped_gamma(ratio, off, cfg.offpolicy_weight)
            weight = ratio / (ratio + gamma)  # (B, R) w/(w+gamma): d/dlogp = gamma w/(w+gamma)^2
            metrics["offpolicy_gamma"] = float(gamma)
        else:
            weight = ratio
        loss = torch.where(off, -adv * weight, loss)
        metrics["offpolicy_weight_mean"] = _mean(weight, off)
    on = mask & ~off
    metrics |= {
        "clipfrac": _mean(clipped.float(), on),
        "clipfrac_dual": _mean(capped.float(), on),
        "approx_kl": _approx_kl(logratio, ratio, on),
        "ratio_mean": _mean(ratio, on),
    }
    return LossOutputs(loss=reduce.tokens(loss, inp.mask), metrics=metrics)


# ----------------------------------------------------------------------------- REINFORCE


def reinforce(inp: LossInputs, cfg: ReinforceLoss, reduce: Reducer) -> LossOutputs:
    """-A log pi_theta / (1 + tau): REINFORCE without ratio or clip; tau=1 is R3L's OPMD loss
    (Trinity-RFT opmd_policy_loss). Off-policy flags are ignored: every counted token is trained."""
    loss = -inp.advantages * inp.logprobs / (1.0 + cfg.tau)  # (B, R)
    logratio, ratio = _ratio(inp)
    mask = inp.mask > 0
    return LossOutputs(
        loss=reduce.tokens(loss, inp.mask),
        metrics={"approx_kl": _approx_kl(logratio, ratio, mask), "ratio_mean": _mean(ratio, mask)},
    )


# ----------------------------------------------------------------------------- NFT


def straight_through_clamp(x: Tensor, min: float) -> Tensor:
    """Forward: x.clamp(min=min); backward: the gradient of x itself (NFT's clamp_preserve_grad)."""
    return x + (x.clamp(min=min) - x).detach()


def _nft_weight(rhat: Tensor, normalize: int) -> Tensor:
    if normalize == 1:
        return 1.0 - rhat
    if normalize == 2:
        return ((1.0 - rhat) / rhat).sqrt()
    return torch.ones_like(rhat)


def nft(inp: LossInputs, cfg: NFTLoss, reduce: Reducer) -> LossOutputs:
    """Negative-aware Fine-Tuning (Chen et al. 2025, arXiv 2505.18116; NVlabs/NFT dp_actor.py).

    y = 1[reward > 0] (rewards may be 0/1 or +-1: both map to y). r_q = the group's success rate
    = (mean of +-1 rewards + 1)/2, clamped to [rhat_min, rhat_max]. R_t = exp(min(logp - behaviour, cap)).
    positive tokens: -log R_t;  negative tokens: -log STclamp((1 - r_q R_t) / (1 - r_q), min=1)
    where STclamp's forward is clamped and its gradient is the unclamped input's.
    tok = w_q [y l+ + neg_weight (1 - y) l-], w_q = 1 - r_q (normalize 1), sqrt((1-r_q)/r_q) (2), 1 (0).
    Departures: NFT asserts every group has 0 < r_q < 1 (dynamic sampling upstream); here the clamp
    alone keeps all-equal groups finite. `ratio_cap` caps the LOG-ratio (NFT's clamp(max=10) before
    exp). NFT's neg_weight < 0 switch to the DAPO loss is not copied: use loss ppo_clip for that.
    The paper reduces by sum/1000: use reduce sum_over_constant.
    """
    assert inp.rewards is not None and inp.group_ids is not None, "nft needs LossInputs.rewards and group_ids"
    y = (inp.rewards > 0).to(inp.logprobs.dtype)  # (B,)
    rhat = group_stats(y, inp.group_ids)[0].clamp(cfg.rhat_min, cfg.rhat_max)  # (B,)
    logratio = (inp.logprobs - inp.behaviour_logprobs).clamp(-LOGRATIO_CLAMP, cfg.ratio_cap)  # (B, R)
    ratio = logratio.exp()
    pos = -logratio  # -log R_t
    r_q = rhat[:, None]  # (B, 1)
    proxy = (1.0 - r_q * ratio) / (1.0 - r_q)  # (B, R)
    neg = -torch.log(straight_through_clamp(proxy, NFT_NEG_CLAMP_MIN))  # (B, R)
    y_t = y[:, None]
    tok = _nft_weight(rhat, cfg.normalize)[:, None] * (y_t * pos + cfg.neg_weight * (1.0 - y_t) * neg)  # (B, R)
    mask = inp.mask > 0
    return LossOutputs(
        loss=reduce.tokens(tok, inp.mask),
        metrics={
            "rhat_mean": float(rhat.mean()) if rhat.numel() else 0.0,
            "neg_clamped_frac": _mean((proxy < NFT_NEG_CLAMP_MIN).float(), mask & (y_t == 0)),
            "approx_kl": _approx_kl(logratio, ratio, mask),
            "ratio_mean": _mean(ratio, mask),
        },
    )


# ----------------------------------------------------------------------------- PACS


def _class_weights(y: Tensor, group_ids: Tensor, active: Tensor) -> Tensor:
    """sklearn 'balanced' weights n / (2 n_class) inside groups holding both labels, else 1. (B,)"""
    p, _, n = group_stats(y, group_ids, active)  # p = positive share among the group's active rows
    n_pos = p * n
    n_cls = torch.where(y > 0, n_pos, n - n_pos)  # (B,)
    mixed = (n_pos > 0.5) & (n - n_pos > 0.5)
    return torch.where(mixed, n / (2.0 * n_cls.clamp(min=1.0)), torch.ones_like(y))


def pacs(inp: LossInputs, cfg: PACSLoss, reduce: Reducer) -> LossOutputs:
    """PACS (ritzz-ai/PACS pacs_core_algos.py): the outcome reward as a label for an implicit score.

    r_i = beta sum_t (logp - behaviour_logp) m_t (masked, unlike the original code); psi_i = r_i minus
    the mean of r_j over the OTHER counted members of its group (RLOO; gradients flow through the
    baseline too); loss_i = w_i BCEWithLogits(psi_i, y_i), y_i = 1[reward > 0], w_i balanced per
    group (cfg.balanced); reduced with reduce.seqs (the original's mean over rows).
    Rows with an all-zero mask are left out of baselines, weights and the loss. A row alone in its
    group has no baseline (psi = r_i). Every micro-batch must hold whole groups (as in PACS).
    """
    assert inp.rewards is not None and inp.group_ids is not None, "pacs needs LossInputs.rewards and group_ids"
    mask = inp.mask > 0  # (B, R)
    active = mask.any(-1)  # (B,)
    logratio = torch.where(mask, inp.logprobs - inp.behaviour_logprobs, torch.zeros_like(inp.logprobs))  # (B, R)
    score = cfg.beta * logratio.sum(-1)  # (B,)
    mean, _, n = group_stats(score, inp.group_ids, active)
    a = active.to(score.dtype)
    others = n - a  # (B,) counted members besides this row
    baseline = (mean * n - score * a) / others.clamp(min=1.0)
    psi = torch.where(others > 0, score - baseline, score)  # (B,)
    y = (inp.rewards > 0).to(score.dtype)  # (B,)
    w = _class_weights(y, inp.group_ids, active) if cfg.balanced else torch.ones_like(y)
    bce = F.binary_cross_entropy_with_logits(psi, y, reduction="none") * w  # (B,)
    bce = torch.where(active, bce, torch.zeros_like(bce))
    return LossOutputs(
        loss=reduce.seqs(bce),
        metrics={"psi_mean": _mean(psi, active), "pacs_acc": _mean(((psi > 0).to(y.dtype) == y).float(), active)},
    )


# ----------------------------------------------------------------------------- ROVER


def rover(inp: LossInputs, cfg: ROVERLoss, reduce: Reducer) -> LossOutputs:
    """ROVER (He et al. 2025, arXiv 2509.24981; tinnerhrhe/ROVER dp_actor.py, compute_rover_loss).

    Q_t = rho (logp_t - behaviour_logp_t); V_{t+1} = rho (vocab-mean log-softmax at t+1 under pi_theta
    minus the same under the behaviour policy), 0 after the last counted token, times next_q_scale;
    loss_t = (Q_t - stopgrad(A_t + V_{t+1}))^2, reduced per token. The options use_rover_clip and
    response_level_rover_loss are not implemented.
    """
    assert inp.vocab_mean_logprobs is not None and inp.behaviour_vocab_mean is not None, (
        "rover needs vocab_mean_logprobs and behaviour_vocab_mean (its LOSSES entry asks for them)")
    mask = inp.mask > 0  # (B, R)
    logratio, ratio = _ratio(inp)
    q = cfg.rho * logratio  # (B, R)
    v = cfg.rho * (inp.vocab_mean_logprobs - inp.behaviour_vocab_mean).detach()  # (B, R) V at each state
    v_next = torch.zeros_like(v)
    v_next[:, :-1] = torch.where(mask[:, 1:], v[:, 1:], torch.zeros_like(v[:, 1:]))  # (B, R)
    target = (inp.advantages + cfg.next_q_scale * v_next).detach()  # (B, R)
    return LossOutputs(
        loss=reduce.tokens((q - target) ** 2, inp.mask),
        metrics={
            "q_mean": _mean(q, mask),
            "target_mean": _mean(target, mask),
            "approx_kl": _approx_kl(logratio, ratio, mask),
        },
    )


# ----------------------------------------------------------------------------- auxiliary terms


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None, reduce: Reducer
) -> LossOutputs:
    """PPO value loss 0.5 max((V - R)^2, (old_V + clip(V - old_V, -c, c) - R)^2); clip None = 0.5 (V - R)^2.

    values, old_values, returns, mask: (B, R). Metric vf_clipfrac: share of tokens where the clipped term won.
    """
    ret = returns.detach()
    l1 = (values - ret) ** 2  # (B, R)
    m = mask > 0
    if clip is None:
        return LossOutputs(loss=0.5 * reduce.tokens(l1, mask), metrics={"vf_clipfrac": 0.0})
    v_clip = old_values.detach() + (values - old_values.detach()).clamp(-clip, clip)  # (B, R)
    l2 = (v_clip - ret) ** 2
    return LossOutputs(
        loss=0.5 * reduce.tokens(torch.maximum(l1, l2), mask), metrics={"vf_clipfrac": _mean((l2 > l1).float(), m)}
    )


def calibration(inp: LossInputs, cfg: CalibrationConfig, expert_logprobs: Tensor, reduce: Reducer) -> LossOutputs:
    """CalibRL's calibration term (zhh6425/CalibRL core_algos.compute_mix_policy_loss):
    |A| LeakyReLU(-s (logp - expert_logp), negative_slope), s = +1 if reward > success else -1,
    on on-policy counted tokens. expert_logprobs (B, R) is the expert sequence's behaviour log-prob
    aligned to each row by token position (as the original code does); it gets no gradient.
    Returned unscaled: the caller multiplies by cfg.coef.
    """
    assert inp.rewards is not None, "calibration needs LossInputs.rewards"
    assert expert_logprobs.shape == inp.logprobs.shape, f"{expert_logprobs.shape} vs {inp.logprobs.shape}"
    s = torch.where(inp.rewards > cfg.success, 1.0, -1.0).to(inp.logprobs.dtype)[:, None]  # (B, 1)
    d = inp.logprobs - expert_logprobs.detach()  # (B, R)
    term = inp.advantages.abs() * F.leaky_relu(-s * d, negative_slope=cfg.negative_slope)  # (B, R)
    on = inp.mask > 0
    if inp.offpolicy is not None:
        on = on & ~inp.offpolicy.bool()
    return LossOutputs(loss=reduce.tokens(term, on.to(inp.mask.dtype) * inp.mask), metrics={"calib_gap": _mean(d, on)})


def entropy_bonus(entropy: Tensor, mask: Tensor, reduce: Reducer) -> LossOutputs:
    """The reduced policy entropy (B, R) -> scalar; the caller SUBTRACTS coef * this from the loss."""
    return LossOutputs(loss=reduce.tokens(entropy, mask))


def ce_loss(logprobs: Tensor, mask: Tensor, reduce: Reducer) -> LossOutputs:
    """Negative log-likelihood (SFT) of the counted tokens: reduce(-logprobs)."""
    return LossOutputs(loss=reduce.tokens(-logprobs, mask))


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: Estimator, reduce: Reducer) -> LossOutputs:
    """KL(pi_theta || pi_ref) as a loss term: reduce(kl_estimate(logprobs, ref_logprobs, estimator))."""
    return LossOutputs(loss=reduce.tokens(kl_estimate(logprobs, ref_logprobs.detach(), estimator), mask))
