"""The rollout protocol every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from guidedrl.core.types import FinishReason


@dataclass
class Generation:
    """One sampled continuation of a context."""

    ids: list[int]
    """Generated token ids (after any forced prefix; stop-string tail removed)."""
    logprobs: list[float]
    """Behaviour log-prob of each generated token under the sampling distribution's model."""
    text: str
    finish_reason: FinishReason


@dataclass
class GenRequest:
    """Sample `n` continuations of `context` (+ an optional forced response prefix)."""

    context: list[int]
    n: int = 1
    prefix: list[int] = field(default_factory=list)
    """Teacher-forced response tokens; generation continues after them (not part of Generation.ids)."""


class Engine(Protocol):
    """A generation backend (transformers today; vLLM / remote later)."""

    def generate(
        self,
        requests: list[GenRequest],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """One list of `n` Generations per request, in order."""
        ...
