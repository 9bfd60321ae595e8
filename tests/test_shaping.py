"""DAPO reward shaping and dynamic-sampling filter, by hand."""

from __future__ import annotations

import pytest
import torch

from guidedrl.algo.reward_shaping import groups_with_signal, overlong_penalty
from guidedrl.core.errors import ConfigError

T = torch.tensor


def test_overlong_penalty_by_hand():
    # L_max 100, L_cache 20: no penalty up to 80 tokens, then linear to -factor at 100
    # 50 -> 0; 80 -> 0; 90 -> -(10 / 20) = -0.5; 100 -> -1.0
    lengths = T([50, 80, 90, 100])
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, 1.0), T([0.0, 0.0, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, 2.0), T([0.0, 0.0, -1.0, -2.0]))
    # 81 -> -(1 / 20) = -0.05
    torch.testing.assert_close(overlong_penalty(T([81]), 100, 20, 1.0), T([-0.05]))


def test_bad_cache_len_is_a_config_error():
    from guidedrl.core.config import load_config

    with pytest.raises(ConfigError, match="reward.overlong.cache_len"):
        load_config(None, ["reward.overlong={cache_len: 0}"])
    with pytest.raises(ConfigError, match="reward.overlong.cache_len"):
        load_config(None, ["reward.overlong={cache_len: 81}", "rollout.max_new_tokens=80"])


def test_groups_with_signal_by_hand():
    # group 3: [1, 1] all equal -> no; group 7: [0, 1] -> yes; group 9 (alone): no;
    # group 2: [0.5, 0.5, 0.25] -> yes (not all equal even though two are)
    rewards = T([1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.25, 1.0])
    groups = T([3, 7, 3, 9, 2, 2, 2, 7])
    assert groups_with_signal(rewards, groups).tolist() == [False, True, False, False, True, True, True, True]


def test_groups_with_signal_empty():
    assert groups_with_signal(T([]), T([], dtype=torch.long)).shape == (0,)
