"""Decode weights cast once (`rollout.cast_weights_once`): under `model.autocast`, the rollouts run
a copy of the policy whose trunk linear weights are stored in the autocast dtype.

Why: autocast casts every float32 weight to bf16 at every forward. In training that is one cast per
micro-batch of thousands of tokens; in decoding it is one cast per token step, and a decode step is
bound by memory: reading 4 bytes and writing 2 for every weight, then reading the 2 again, triples
the step's traffic. So autocast made the update faster but not the decode (cpu-135m, in
docs/performance.md).

The copy holds exactly what autocast would have cast: the weights and biases of the `nn.Linear`
modules inside the decoder trunk, rounded to the autocast dtype as `Tensor.to` rounds them. Under
autocast a linear casts its float32 input to that dtype and leaves an input already in it alone, so
the decode computes the same numbers from the copy as from the policy. Every other parameter and
buffer (embeddings, norms, the LM head, rotary tables) is the policy's own tensor, shared, not copied:
the LM head and the log-probs stay float32. Memory: half the linear weights' float32 size.

The copy is re-cast from the policy in place at the start of every `generate` call: one cast pass
(18 ms for the 106M linear weights of bench_trl.py's cpu-135m job on 2 cores, against 5.8 s for its
decode), and compiled or CUDA-graph decode steps that hold the copy's addresses stay valid. Not
skipped by checking the weights' version counters: a fused AdamW step and writes through `.data`
(a distributed broadcast) change weights without bumping them.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from guidedrl.core.config import ModelConfig, RolloutConfig
from guidedrl.nn.models import trunk_and_head


class CastWeights:
    """The policy's decode copy with its trunk's linear weights in `dtype`, re-cast by `refresh`."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype) -> None:
        trunk, _ = trunk_and_head(policy)
        memo: dict[int, object] = {}
        self._pairs: list[tuple[Tensor, Tensor]] = []  # (policy's weight, the copy's)
        for mod in trunk.modules():
            if isinstance(mod, nn.Linear):
                for p in mod.parameters(recurse=False):
                    if id(p) not in memo:
                        cast = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                        memo[id(p)] = cast
                        self._pairs.append((p, cast))
        # everything else is shared: deepcopy returns the memo's object for a tensor it already holds
        for t in [*policy.parameters(), *policy.buffers()]:
            memo.setdefault(id(t), t)
        # (deepcopy drops Module.compile's wrapper: a compiled policy's copy runs eager until compiled)
        self.module = copy.deepcopy(policy, memo).eval()

    def refresh(self) -> nn.Module:
        """The copy, with the policy's current weights cast into it (in place)."""
        with torch.no_grad():
            for src, dst in self._pairs:
                dst.copy_(src)
        return self.module

    def extra_bytes(self) -> int:
        """Memory the copy adds (its cast linear weights)."""
        return sum(dst.numel() * dst.element_size() for _, dst in self._pairs)


def decode_copy(model: nn.Module, model_cfg: ModelConfig, rollout_cfg: RolloutConfig) -> CastWeights | None:
    """The decode copy of `model` that `model.autocast` and `rollout.cast_weights_once` ask for, if any
    (build it before compiling the model's layers: deepcopy drops their compiled wrappers)."""
    if model_cfg.autocast == "none" or not rollout_cfg.cast_weights_once:
        return None
    return CastWeights(model, getattr(torch, model_cfg.autocast))
