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
    P = max(len(c.context_ids) for c in completions)
    R = max(1, max(len(c.ids) for c in completions))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros((B, R))
    resp_mask = torch.zeros((B, R))
    old_lp = torch.zeros((B, R))
    offpolicy = torch.zeros((B, R), dtype=torch.bool)
    sft = torch.zeros((B, R), dtype=torch.bool)
    for b, c in enumerate(completions):
        ctx, n = c.context_ids, len(c.ids)
        assert len(c.logprobs) == n and len(c.mask) == n, f"row {b}: ids/logprobs/mask lengths differ"
        input_ids[b, P - len(ctx) : P] = torch.tensor(ctx, dtype=torch.long)
        attn[b, P - len(ctx) : P + n] = 1
        if n:
            input_ids[b, P : P + n] = torch.tensor(c.ids, dtype=torch.long)
            keep = 0.0 if (mask_truncated and c.finish_reason == "length") else 1.0
            mask[b, :n] = torch.tensor(c.mask) * keep
            resp_mask[b, :n] = 1.0
            old_lp[b, :n] = torch.tensor(c.logprobs)
            offpolicy[b, :n] = c.offpolicy
            sft[b, :n] = c.sft
    extras: dict[str, torch.Tensor] = {}
    for key in sorted({k for c in completions for k in c.token_extras}):
        t = torch.zeros((B, R))
        for b, c in enumerate(completions):
            vals = c.token_extras.get(key, [])[:R]
            t[b, : len(vals)] = torch.tensor(vals, dtype=torch.float32)
        extras[key] = t
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P+R) counts real tokens only
    return Batch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=position_ids,
        prompt_len=P,
        response_ids=input_ids[:, P:].clone(),
        mask=mask,
        response_mask=resp_mask,
        old_logprobs=old_lp,
        offpolicy=offpolicy,
        sft=sft,
        rewards=torch.tensor([c.reward for c in completions], dtype=torch.float32),
        group_ids=torch.tensor([c.group for c in completions], dtype=torch.long),
        onpolicy_rows=torch.tensor([c.source == "policy" and not c.offpolicy for c in completions]),
        recompute_rows=torch.tensor(
            [c.context_ids != c.prompt_ids and not c.offpolicy for c in completions], dtype=torch.bool
        ),
        extras=extras,
    )
