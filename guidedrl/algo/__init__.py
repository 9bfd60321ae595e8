"""The algorithm registries: plain dicts from config names to pure functions, read only where the
config is resolved. A new estimator is one function plus one entry here; a new loss term one
function plus one entry in `guidedrl.algo.terms` (LOSSES, TERMS)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from guidedrl.algo import advantages, kl, losses, reduce  # noqa: F401  (algo.kl etc. for callers)
from guidedrl.algo.terms import LOSSES, TERMS, Needs, Term  # noqa: F401
from guidedrl.core.errors import ConfigError

ADVANTAGES: dict[str, Callable[..., Any]] = {
    "grpo": advantages.grpo,
    "rloo": advantages.rloo,
    "reinforce_pp": advantages.reinforce_pp,
    "lite_ppo": advantages.lite_ppo,
    "amplified": advantages.amplified,
    "gae": advantages.gae,
}

F = TypeVar("F")


def get(registry: dict[str, F], name: str, key: str = "name") -> F:
    """registry[name], or a ConfigError naming the config `key` and listing the valid names."""
    if name not in registry:
        raise ConfigError(f"`{key}`: unknown {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]
