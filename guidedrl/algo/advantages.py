"""Advantage estimators: pure functions `fn(inp: AdvantageInputs, cfg) -> AdvantageOutputs`.

Every estimator returns per-token advantages (B, R), exactly zero where `inp.mask` is 0.
Sequence-level estimators broadcast one value per row to its tokens.

Conventions (shared by all estimators):
- Group statistics are computed over the rows of the batch this process holds (groups are never
  split across processes); batch statistics (REINFORCE++, Lite PPO, GAE whitening) are global, via
  `guidedrl.core.dist`.
- Standard deviations are unbiased (Bessel's correction), like `torch.std` in TRL's and verl's GRPO.
- A group with fewer than two counted members has no defined std: its advantage is not divided
  (so a group of one gets r - r = 0, never NaN). verl instead uses mean 0 / std 1 for singletons,
  which gives A = r; we prefer "no baseline, no signal".

References: GRPO (Shao et al. 2024, arXiv 2402.03300); Dr.GRPO (Liu et al. 2025, arXiv
2503.20783); RLOO (Ahmadian et al. 2024, arXiv 2402.14740); REINFORCE++ (Hu 2025, arXiv
2501.03262); Lite PPO (Liu et al. 2025, arXiv 2508.08221); R3L (Shi et al. 2026) opmd_reweight;
GAE (Schulman et al. 2016, arXiv 1506.02438).
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidedrl.core import dist
from guidedrl.core.config import (
    AmplifiedAdvantage,
    GAEAdvantage,
    GRPOAdvantage,
    LitePPOAdvantage,
    ReinforcePPAdvantage,
    RLOOAdvantage,
)
from guidedrl.core.types import AdvantageInputs, AdvantageOutputs

WHITEN_EPS = 1e-8
"""Added to the variance when whitening GAE advantages (verl's masked_whiten)."""


def group_stats(values: Tensor, group_ids: Tensor, counted: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row mean, unbiased std and member count of `values` over rows sharing a group id.

    values (B,) float; group_ids (B,) any integer ids (need not be contiguous);
    counted (B,) bool/float: only these rows enter the statistics (all rows if None), but every
    row receives the statistics of its group. -> (mean, std, count), each (B,).
    std is 0 where count < 2. Differentiable in `values` (PACS's baseline needs that).
    """
    assert values.dim() == 1 and values.shape == group_ids.shape, f"{values.shape} vs {group_ids.shape}"
    if values.numel() == 0:
        return values.clone(), values.clone(), values.clone()
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,) dense group index
    n_groups = int(inv.max()) + 1
    w = torch.ones_like(values) if counted is None else counted.to(values.dtype)  # (B,)
    zeros = values.new_zeros(n_groups)
    count = zeros.index_add(0, inv, w)  # (G,)
    mean = zeros.index_add(0, inv, values * w) / count.clamp(min=1.0)  # (G,)
    ss = zeros.index_add(0, inv, (values - mean[inv]) ** 2 * w)  # (G,)
    var = ss / (count - 1.0).clamp(min=1.0)
    std = torch.where(count >= 2, var.clamp(min=0).sqrt(), torch.zeros_like(var))  # (G,)
    return mean[inv], std[inv], count[inv]


def _rewards(inp: AdvantageInputs) -> Tensor:
    dtype = inp.mask.dtype if inp.mask.is_floating_point() else torch.float32
    r = inp.rewards.to(dtype)  # (B,)
    B = inp.mask.shape[0]
    assert r.shape == (B,), f"rewards {tuple(r.shape)} vs mask {tuple(inp.mask.shape)}"
    assert inp.group_ids.shape == (B,), f"group_ids {tuple(inp.group_ids.shape)} vs mask {tuple(inp.mask.shape)}"
    return r


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, R), zero where mask is 0."""
    return torch.where(mask > 0, seq_adv[:, None].expand(mask.shape), 0.0)  # (B, R)


def grpo(inp: AdvantageInputs, cfg: GRPOAdvantage) -> AdvantageOutputs:
    """GRPO: A_i = (r_i - mean_g r) / (std_g r + eps); cfg.std False drops the division (Dr.GRPO, LUFFY).

    stats_from="onpolicy" takes mean/std from the group's on-policy rows only (CalibRL; LUFFY's
    grpo_split) and applies them to every row of the group. A group with no on-policy row falls
    back to all of its rows. Caution: with std on and an all-equal on-policy set, off-policy rows
    get (r - mean)/eps -- huge; the recipes that use on-policy stats (CalibRL) turn std off.
    """
    r = _rewards(inp)  # (B,)
    mean, std, n = group_stats(r, inp.group_ids)
    if cfg.stats_from == "onpolicy":
        assert inp.onpolicy is not None, "stats_from=onpolicy needs AdvantageInputs.onpolicy"
        m_on, s_on, n_on = group_stats(r, inp.group_ids, inp.onpolicy)
        has_on = n_on > 0  # (B,)
        mean, std, n = torch.where(has_on, m_on, mean), torch.where(has_on, s_on, std), torch.where(has_on, n_on, n)
    a = r - mean  # (B,)
    if cfg.std:
        a = torch.where(n >= 2, a / (std + cfg.eps), a)
    return AdvantageOutputs(advantages=_broadcast(a, inp.mask))


def rloo(inp: AdvantageInputs, cfg: RLOOAdvantage) -> AdvantageOutputs:
    """RLOO: A_i = r_i - mean_{j != i, same group} r_j = G/(G-1) (r_i - mean_g r); 0 for a group of one."""
    r = _rewards(inp)  # (B,)
    mean, _, n = group_stats(r, inp.group_ids)
    a = torch.where(n >= 2, (r - mean) * n / (n - 1.0).clamp(min=1.0), torch.zeros_like(r))  # (B,)
    return AdvantageOutputs(advantages=_broadcast(a, inp.mask))


def reinforce_pp(inp: AdvantageInputs, cfg: ReinforcePPAdvantage) -> AdvantageOutputs:
    """REINFORCE++: rewards whitened over the global batch, (A - mean) / (std + eps).

    With group_baseline, the group mean is subtracted first (REINFORCE++-baseline).
    Departure / choice: like verl (`masked_whiten`) and OpenRLHF, the mean and std are taken over
    every counted *token* of the global batch, so a sequence weighs by its length; with equal
    lengths this equals the per-sequence batch statistics.
    """
    r = _rewards(inp)  # (B,)
    if cfg.group_baseline:
        r = r - group_stats(r, inp.group_ids)[0]
    tok = _broadcast(r, inp.mask)  # (B, R)
    mask = inp.mask > 0  # (B, R)
    mean, std = dist.global_mean_std(tok, mask)
    return AdvantageOutputs(advantages=torch.where(mask, (tok - mean) / (std + cfg.eps), torch.zeros_like(tok)))


def lite_ppo(inp: AdvantageInputs, cfg: LitePPOAdvantage) -> AdvantageOutputs:
    """Lite PPO: A_i = (r_i - mean_g r) / (std over the global batch of the RAW rewards + eps).

    Matches ROLL's reward_norm(norm_mean_type="group", norm_std_type="batch"): the batch std is
    over every row's raw reward (one value per sequence), not over the centred residuals.
    """
    r = _rewards(inp)  # (B,)
    mean_g = group_stats(r, inp.group_ids)[0]
    _, std_b = dist.global_mean_std(r, torch.ones_like(r))
    return AdvantageOutputs(advantages=_broadcast((r - mean_g) / (std_b + cfg.eps), inp.mask))


def amplified(inp: AdvantageInputs, cfg: AmplifiedAdvantage) -> AdvantageOutputs:
    """R3L opmd_reweight: b = group mean; A = 1 if r >= success, elif r - b >= 0: scale*(r - b), else r - b."""
    r = _rewards(inp)  # (B,)
    d = r - group_stats(r, inp.group_ids)[0]  # (B,)
    a = torch.where(r >= cfg.success, torch.ones_like(r), torch.where(d >= 0, cfg.positive_scale * d, d))
    return AdvantageOutputs(advantages=_broadcast(a, inp.mask))


def _last_token_rewards(inp: AdvantageInputs) -> Tensor:
    """Per-token rewards (B, R): the sequence reward at the last counted token, plus token_rewards."""
    mask = inp.mask > 0  # (B, R)
    R = mask.shape[1]
    pos = torch.arange(1, R + 1, device=mask.device).expand_as(mask)  # (B, R) 1-based positions
    last = (pos * mask).argmax(-1)  # (B,) index of the last counted token (0 for an empty row)
    r = _rewards(inp)  # (B,)
    rew = r.new_zeros(mask.shape)  # (B, R)
    seq = torch.where(mask.any(-1), r, torch.zeros_like(r))  # (B,)
    rew.scatter_(1, last[:, None], seq[:, None])
    if inp.token_rewards is not None:
        rew = rew + torch.where(mask, inp.token_rewards.to(rew.dtype), torch.zeros_like(rew))
    return rew


def gae(inp: AdvantageInputs, cfg: GAEAdvantage) -> AdvantageOutputs:
    """GAE(gamma, lambda) with a critic: A_t = sum_k (gamma*lam)^k delta_{t+k},
    delta_t = r_t + gamma V_{t+1} - V_t; returns = A + V (the value targets).

    The sequence reward sits on the last counted token, plus `token_rewards` (e.g. -beta*KL) on
    every counted token. Masked tokens inside a response (guide prefix, injected feedback) are
    skipped: V and the running GAE carry over them unchanged (verl's multi-turn GAE), and they get
    advantage and return 0. With cfg.whiten the advantages are whitened over the counted tokens of
    the global batch (unbiased variance, verl's masked_whiten); returns are computed before that.
    """
    assert inp.values is not None, "gae needs AdvantageInputs.values (a critic)"
    mask = inp.mask > 0  # (B, R)
    rewards = _last_token_rewards(inp)  # (B, R)
    m = mask.to(rewards.dtype)
    values = inp.values.detach().to(m.dtype) * m  # (B, R)
    B, R = mask.shape
    next_v = values.new_zeros(B)  # (B,)
    run = values.new_zeros(B)  # (B,)
    adv = torch.zeros_like(values)  # (B, R)
    for t in reversed(range(R)):
        delta = rewards[:, t] + cfg.gamma * next_v - values[:, t]  # (B,)
        here = delta + cfg.gamma * cfg.lam * run  # (B,)
        mt = m[:, t]
        run = here * mt + run * (1 - mt)
        next_v = values[:, t] * mt + next_v * (1 - mt)
        adv[:, t] = here * mt
    returns = (adv + values) * m  # (B, R)
    if cfg.whiten:
        mean, std = dist.global_mean_std(adv, mask)
        var = std**2
        adv = torch.where(mask, (adv - mean) * torch.rsqrt(var + WHITEN_EPS), torch.zeros_like(adv))
    return AdvantageOutputs(advantages=adv, returns=returns)
