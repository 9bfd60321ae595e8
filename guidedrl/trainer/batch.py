"""Collate Completions into a padded Batch (contexts left-padded, responses right-padded)."""

from __future__ import annotations

import torch

from guidedrl.core.types import Batch, Completion


def collate(completions: list[Completion], pad_id: int, mask_truncated: bool = False) -> Batch:
    """Completions -> Batch. Rows with an empty response get an all-zero mask.

    mask_truncated: zero the loss mask of completions that hit the length limit (DAPO's
    overlong filtering).
    """
    assert completions, "collate needs at least one completion"
    B = len(completions)
    P = max(len(c.context) for c in completions)
    R = max(1, max(len(c.ids) for c in completions))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros((B, R))
    resp_mask = torch.zeros((B, R))
    behaviour = torch.zeros((B, R))
    offpolicy = torch.zeros((B, R), dtype=torch.bool)
    sft = torch.zeros((B, R), dtype=torch.bool)
    for b, c in enumerate(completions):
        ctx, n = c.context, len(c.ids)
        assert len(c.behaviour_logprobs) == n and len(c.mask) == n, f"row {b}: ids/behaviour_logprobs/mask lengths differ"
        input_ids[b, P - len(ctx) : P] = torch.tensor(ctx, dtype=torch.long)
        attn[b, P - len(ctx) : P + n] = 1
        if n:
            input_ids[b, P : P + n] = torch.tensor(c.ids, dtype=torch.long)
            keep = 0.0 if (mask_truncated and c.finish_reason == "length") else 1.0
            mask[b, :n] = torch.tensor(c.mask) * keep
            resp_mask[b, :n] = 1.0
            behaviour[b, :n] = torch.tensor(c.behaviour_logprobs)
            offpolicy[b, :n] = c.offpolicy
            sft[b, :n] = c.sft
    expert = any(c.expert_logprobs is not None for c in completions)
    expert_lp = torch.zeros((B, R)) if expert else None
    expert_mask = torch.zeros((B, R)) if expert else None
    for b, c in enumerate(completions):
        if c.expert_logprobs is not None and expert_lp is not None and expert_mask is not None:
            vals = c.expert_logprobs[:R]
            expert_lp[b, : len(vals)] = torch.tensor(vals, dtype=torch.float32)
            expert_mask[b, : c.expert_len] = 1.0
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P+R) counts real tokens only
    return Batch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=position_ids,
        prompt_len=P,
        response_ids=input_ids[:, P:].clone(),
        mask=mask,
        response_mask=resp_mask,
        behaviour_logprobs=behaviour,
        offpolicy=offpolicy,
        sft=sft,
        rewards=torch.tensor([c.reward for c in completions], dtype=torch.float32),
        group_ids=torch.tensor([c.group for c in completions], dtype=torch.long),
        onpolicy_rows=torch.tensor([c.origin == "policy" and not c.offpolicy for c in completions]),
        recompute_rows=torch.tensor([c.context != c.gen_context and not c.offpolicy for c in completions], dtype=torch.bool),
        expert_logprobs=expert_lp,
        expert_mask=expert_mask,
    )
