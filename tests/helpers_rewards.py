"""Reward functions used by tests through the `module:function` path users take for their own."""

from __future__ import annotations

from guidedrl.core.types import Sample


def sevens(samples: list[Sample], completions: list[str]) -> list[float]:
    """Share of the completion's characters that are the digit 7 (dense, trivially learnable).

    >>> sevens([Sample(id="a", prompt="")] * 2, ["777", "a7b7"])
    [1.0, 0.5]
    """
    return [c.count("7") / len(c) if c else 0.0 for c in completions]


def boom(samples: list[Sample], completions: list[str]) -> list[float]:
    """Raises for the second sample (tests the reward-error path)."""
    if len(samples) > 1:
        raise ValueError("user reward exploded")
    return [0.0] * len(samples)

