"""Which prompts each step trains on."""

from __future__ import annotations

import random
from typing import Any

from guidedrl.core.types import Sample


class UniformSelector:
    """Walks the training set in shuffled epochs; its position is part of the checkpoint."""

    def __init__(self, samples: list[Sample], seed: int, shuffle: bool = True) -> None:
        assert samples, "the training set is empty"
        self.samples = samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Sample]:
        """The next `n` samples (wrapping into a new shuffled epoch)."""
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._make_order()
            out.append(self.samples[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
