"""Typed records that flow through one training step.

Sample -> (rollout) Completion -> (collate) Batch -> (per micro-batch) LossInputs -> LossOutputs.

Every Completion carries what the loss needs (its generation and training contexts, loss mask,
behaviour log-probs and whether its tokens are off-policy), so the trainer never needs to know
which algorithm made it. Shapes: B = sequences in a (micro-)batch, R = response length (padded),
T = full length.

Names used everywhere: the *generation context* is what a response was sampled in (it may hold
guidance text); the *training context* is what it is trained under (the same, or the plain prompt
when guidance is stripped); *behaviour log-probs* are the log-probs of the sampled tokens under the
policy that produced them (0 for text no model sampled); *guidance* is any text shown to help (a
hint, part of a reference, a critique); a *teacher* is any helper model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

Origin = Literal["policy", "guided", "teacher", "reference"]
"""Who wrote a completion: the policy unguided, the policy under guidance, a teacher, the reference."""
CORRECT = 1.0 - 1e-6
"""A reward at or above this counts as correct (full marks; partial credit below it)."""
FinishReason = Literal["eos", "length", "stop"]


@dataclass
class Sample:
    """One training or evaluation problem."""

    id: str
    prompt: str
    """The problem text (the user turn for chat models, the raw prompt for base models)."""
    answer: str | None = None
    """The checkable final answer, if any."""
    reference: str | None = None
    """A worked reference solution, if any (used by prefix guidance and SFT stages)."""
    hints: list[str] = field(default_factory=list)
    """Hints, weakest first (used by hint guidance)."""
    level: int | None = None
    """Difficulty level, if the task has levels."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other column, passed through to reward functions."""


@dataclass
class Completion:
    """One sampled (or injected) response to a Sample, with its token routing."""

    sample: Sample
    group: int
    """Index of the group (one prompt, G completions) inside the step's batch."""
    gen_context: list[int]
    """The generation context: the ids the response was sampled in (may hold guidance text)."""
    ids: list[int]
    """Response token ids, including any teacher-forced prefix."""
    behaviour_logprobs: list[float]
    """Log-probs of `ids` under the policy that sampled them in `gen_context`; 0.0 for text no
    model sampled (a teacher-forced prefix, a reference solution)."""
    text: str
    finish_reason: FinishReason
    train_context: list[int] | None = None
    """The training context; None means the generation context."""
    loss_mask: list[float] | None = None
    """Per response token: 1 trained, 0 no gradient (guide prefix, injected text). None = all 1."""
    origin: Origin = "policy"
    offpolicy: bool = False
    """Its trained tokens take the off-policy weight (cross-context ratio or shaped w/(w+gamma))."""
    sft: bool = False
    """Its trained tokens also get the cross-entropy (SFT) term when `algo.ce_coef` > 0."""
    reward: float = 0.0
    reward_info: dict[str, Any] = field(default_factory=dict)
    expert_logprobs: list[float] | None = None
    """CalibRL: the policy's rollout-time log-probs of an expert sequence, aligned by position with
    `ids` (0.0 past the expert's end); `expert_len` of them are real."""
    expert_len: int = 0

    @property
    def context(self) -> list[int]:
        """The training context (the generation context unless guidance was stripped)."""
        return self.gen_context if self.train_context is None else self.train_context

    @property
    def mask(self) -> list[float]:
        """The loss mask, defaulting to all ones."""
        return [1.0] * len(self.ids) if self.loss_mask is None else self.loss_mask


@dataclass
class Batch:
    """Completions collated to tensors: prompts left-padded to P, responses right-padded to R.

    Row layout: [pad.. context | response ..pad], so response token j sits at column P + j and is
    predicted by the logits at column P + j - 1.
    """

    input_ids: Tensor  # (B, P+R) long
    attention_mask: Tensor  # (B, P+R) long
    position_ids: Tensor  # (B, P+R) long, counts real tokens only (left padding safe)
    prompt_len: int  # P
    response_ids: Tensor  # (B, R) long
    mask: Tensor  # (B, R) float loss mask (0 on padding too)
    response_mask: Tensor  # (B, R) float, 1 on every real response token (masked or not)
    behaviour_logprobs: Tensor  # (B, R) log-probs of the sampled tokens under the behaviour policy
    offpolicy: Tensor  # (B, R) bool
    sft: Tensor  # (B, R) bool
    rewards: Tensor  # (B,) float
    group_ids: Tensor  # (B,) long
    onpolicy_rows: Tensor  # (B,) bool: origin == "policy" and not offpolicy
    recompute_rows: Tensor  # (B,) bool: trained under another context than sampled, without an IS weight
    advantages: Tensor | None = None  # (B, R)
    returns: Tensor | None = None  # (B, R) PPO value targets
    ref_logprobs: Tensor | None = None  # (B, R)
    old_values: Tensor | None = None  # (B, R) critic values at rollout time
    behaviour_vocab_mean: Tensor | None = None  # (B, R) ROVER: the behaviour policy's mean log-softmax over the vocabulary
    expert_logprobs: Tensor | None = None  # (B, R) CalibRL: rollout-time log-probs of the expert, by position
    expert_mask: Tensor | None = None  # (B, R) 1 where the expert has a token

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        """All tensors moved to `device` (in place; returns self)."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    def select(self, rows: Tensor | list[int]) -> "Batch":
        """A sub-batch of the given rows (for micro-batching); trims no padding."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        changes: dict[str, Any] = {
            name: value[idx] for name, value in vars(self).items() if isinstance(value, Tensor)
        }
        return dataclasses.replace(self, **changes)

    def trimmed(self) -> "Batch":
        """The same rows without columns that are padding in every row: leading prompt columns no
        row attends to and response columns past the longest response. Every per-token value of
        the kept columns is unchanged (positions are explicit), so log-probs and losses are too."""
        P, R = self.prompt_len, self.response_ids.shape[1]
        real = self.attention_mask[:, :P].any(0)  # (P,) prompt columns some row uses
        lead = int(real.float().argmax()) if bool(real.any()) else P
        keep_r = max(1, int(self.response_mask.sum(-1).max()))  # responses are right-padded
        if lead == 0 and keep_r == R:
            return self
        changes: dict[str, Any] = {name: getattr(self, name)[:, lead : P + keep_r] for name in _SEQUENCE_FIELDS}
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            changes[name] = None if value is None else value[:, :keep_r]
        return dataclasses.replace(self, **changes, prompt_len=P - lead)


_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "position_ids")
"""Batch fields laid out over the whole sequence: (B, P+R)."""
_TOKEN_FIELDS = ("response_ids", "mask", "response_mask", "behaviour_logprobs", "offpolicy", "sft", "advantages",
                 "returns", "ref_logprobs", "old_values", "behaviour_vocab_mean", "expert_logprobs", "expert_mask")
"""Batch fields laid out over the response tokens: (B, R); the rest are per row (B,) or scalars."""


@dataclass
class AdvantageInputs:
    """What an advantage estimator may read. Estimators ignore fields they don't need."""

    rewards: Tensor  # (B,) scalar reward per sequence
    group_ids: Tensor  # (B,) long, same id = same prompt
    mask: Tensor  # (B, R) float, tokens that count (response tokens)
    onpolicy: Tensor | None = None  # (B,) bool; group stats from these rows only when asked
    values: Tensor | None = None  # (B, R) critic values (GAE)
    token_rewards: Tensor | None = None  # (B, R) dense per-token rewards (e.g. -kl), added to the last token's reward


@dataclass
class AdvantageOutputs:
    advantages: Tensor  # (B, R), zero on masked tokens
    returns: Tensor | None = None  # (B, R) value targets (GAE only)


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch, what every loss term may read. Terms ignore fields
    they do not need; a new need becomes a field here, not a new signature."""

    logprobs: Tensor  # (B, R) current policy log-probs of the response tokens
    behaviour_logprobs: Tensor  # (B, R) behaviour log-probs (recomputed under the training context where needed)
    advantages: Tensor  # (B, R)
    mask: Tensor  # (B, R) float loss mask
    offpolicy: Tensor | None = None  # (B, R) bool: use the off-policy weight on these tokens
    sft: Tensor | None = None  # (B, R) bool: tokens the cross-entropy term imitates
    rewards: Tensor | None = None  # (B,)
    group_ids: Tensor | None = None  # (B,)
    entropy: Tensor | None = None  # (B, R) the policy's entropy at each response position
    ref_logprobs: Tensor | None = None  # (B, R) reference-model log-probs
    values: Tensor | None = None  # (B, R) current critic values
    old_values: Tensor | None = None  # (B, R)
    returns: Tensor | None = None  # (B, R)
    vocab_mean_logprobs: Tensor | None = None  # (B, R) mean over vocab of log-softmax (ROVER)
    behaviour_vocab_mean: Tensor | None = None  # (B, R)
    expert_logprobs: Tensor | None = None  # (B, R) CalibRL's expert, aligned by position
    expert_mask: Tensor | None = None  # (B, R)


@dataclass
class LossOutputs:
    loss: Tensor  # scalar, already reduced with the global normalizer
    metrics: dict[str, float] = field(default_factory=dict)


class Reducer(Protocol):
    """Turns a per-token or per-sequence loss into a scalar with *global* normalizers.

    Bound once per optimizer step with the token / sequence counts of the whole batch, so that
    summing the micro-batch results equals the loss of the whole batch.
    """

    def tokens(self, loss: Tensor, mask: Tensor) -> Tensor:
        """loss, mask: (B, R) -> scalar."""
        ...

    def seqs(self, loss: Tensor) -> Tensor:
        """loss: (B,) -> scalar (mean over the global number of sequences)."""
        ...


class RewardFn(Protocol):
    """A reward: one score per completion (None = not applicable), optionally with info dicts.

    Called as fn(samples, completions) with two equal-length lists of Sample and completion text.
    Return list[float | None], or (list[float | None], list[dict]).
    """

    def __call__(self, samples: list[Sample], completions: list[str]) -> Any: ...
