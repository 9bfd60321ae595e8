"""Rewards: plain callables `fn(samples, completions) -> list[float | None]` (or `(scores, infos)`).

Built in: `math` (math-verify), `exact` (exact / normalized match), `regex_format`, `reasoning_gym`
(a reasoning-gym dataset's own verifier); `arith` and `code` are imported lazily. `build_reward`
combines terms into the weighted sum a run is scored with.
"""

from guidedrl.rewards.combine import REWARDS, CombinedReward, build_reward
from guidedrl.rewards.match import exact_reward, regex_format_reward
from guidedrl.rewards.math import math_reward
from guidedrl.rewards.reasoning_gym import reasoning_gym_reward

__all__ = [
    "REWARDS",
    "CombinedReward",
    "build_reward",
    "exact_reward",
    "math_reward",
    "reasoning_gym_reward",
    "regex_format_reward",
]
