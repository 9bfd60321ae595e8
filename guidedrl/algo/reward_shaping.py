"""Reward shaping and group filtering from DAPO (Yu et al. 2025, arXiv 2503.14476).

- `overlong_penalty`: the soft overlong punishment, R_len = min(-(|o| - (L_max - L_cache)) / L_cache * factor, 0)
  (verl recipe/dapo reward manager). Departure: the paper's extra -1 for |o| > L_max is not added;
  completions here never exceed max_new_tokens.
- `groups_with_signal`: dynamic sampling keeps groups whose rewards are not all equal (std > 0).
"""

from __future__ import annotations

import torch
from torch import Tensor



def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, factor: float) -> Tensor:
    """lengths (B,) response lengths in tokens -> penalty (B,) <= 0, linear over the last `cache_len` tokens.

    0 for |o| <= max_len - cache_len, falling linearly to -factor at |o| = max_len.
    Requires 1 <= cache_len <= max_len (checked when the config loads).
    """
    assert 1 <= cache_len <= max_len, f"cache_len {cache_len} outside 1..{max_len}"
    exceed = lengths.to(torch.float32) - (max_len - cache_len)  # (B,)
    return torch.clamp(-exceed / cache_len * factor, max=0.0)


def groups_with_signal(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """rewards (B,), group_ids (B,) -> bool (B,): True for rows whose group's rewards are not all equal.

    A group of one never has signal.
    """
    assert rewards.shape == group_ids.shape and rewards.dim() == 1, f"{rewards.shape} vs {group_ids.shape}"
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,)
    n_groups = int(inv.max()) + 1
    r = rewards.to(torch.float64)
    lo = r.new_full((n_groups,), float("inf")).scatter_reduce(0, inv, r, reduce="amin")  # (G,)
    hi = r.new_full((n_groups,), float("-inf")).scatter_reduce(0, inv, r, reduce="amax")  # (G,)
    return (hi > lo)[inv]
