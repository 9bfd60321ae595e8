"""Per-token log-probs (and entropy, values) of the response tokens of a Batch.

The full-vocabulary logits are never materialized for the whole batch: the trunk's hidden states
are projected through the LM head a chunk of positions at a time, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from guidedrl.models import trunk_and_head
from guidedrl.types import Batch


@dataclass
class PolicyOutputs:
    logprobs: Tensor  # (B, R)
    entropy: Tensor | None = None  # (B, R)
    vocab_mean_logprobs: Tensor | None = None  # (B, R) mean over the vocabulary of log-softmax (ROVER)
    values: Tensor | None = None  # (B, R) critic values from the value head
    hidden: Tensor | None = None  # (B, R, H) when asked (value head on a detached trunk)


def response_hidden(model: nn.Module, batch: Batch) -> Tensor:
    """Hidden states that predict each response token: (B, R, H)."""
    trunk, _ = trunk_and_head(model)
    out = trunk(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    h = out.last_hidden_state  # (B, P+R, H)
    P, R = batch.prompt_len, batch.response_ids.shape[1]
    return h[:, P - 1 : P - 1 + R]  # column P+j is predicted by hidden state at P+j-1


def token_logprobs(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    vocab_mean: bool = False,
    chunk_tokens: int = 8192,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """hidden (B, R, H), targets (B, R) -> log-probs (B, R) [, entropy (B, R), vocab-mean log-prob (B, R)]."""
    B, R, _ = hidden.shape
    step = max(1, chunk_tokens // max(B, 1))
    lps, ents, means = [], [], []
    for s in range(0, R, step):
        logits = head(hidden[:, s : s + step]).float() / temperature  # (B, c, V) float32, one chunk only
        logp = logits.log_softmax(-1)
        lps.append(logp.gather(-1, targets[:, s : s + step, None]).squeeze(-1))
        if entropy:
            ents.append(-(logp.exp() * logp).sum(-1))
        if vocab_mean:
            means.append(logp.mean(-1))
    return (
        torch.cat(lps, 1),
        torch.cat(ents, 1) if entropy else None,
        torch.cat(means, 1) if vocab_mean else None,
    )


def policy_outputs(
    model: nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    vocab_mean: bool = False,
    value_head: nn.Module | None = None,
) -> PolicyOutputs:
    """Forward the policy over `batch` and gather what the losses need."""
    _, head = trunk_and_head(model)
    h = response_hidden(model, batch)
    lp, ent, vm = token_logprobs(
        head, h, batch.response_ids, temperature=temperature, entropy=entropy, vocab_mean=vocab_mean
    )
    values = value_head(h.float()).squeeze(-1) if value_head is not None else None  # (B, R)
    return PolicyOutputs(logprobs=lp, entropy=ent, vocab_mean_logprobs=vm, values=values)
