"""ReGFT's pre-RL stage: sample with a partial reference as the start of the response, keep the
verified-correct traces, SFT on them under the plain prompt (Wu et al. 2026)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from guidedrl.trainer.batch import collate
from guidedrl.core.config.guidance import SFTStage
from guidedrl.guidance.pieces import cut
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.rollout.collect import Plan, generate_plans, score
from guidedrl.core.types import CORRECT, Completion

if TYPE_CHECKING:
    from guidedrl.trainer.build import Parts


def collect_traces(parts: "Parts", s: SFTStage) -> list[Completion]:
    """Verified-correct traces (reference prefix + own continuation), as SFT completions."""
    ctx = parts.ctx
    samples = [x for x in parts.selector.samples if x.reference][: s.max_problems]
    items = []
    for i, x in enumerate(samples):
        prefix = ctx.encode(cut(x.reference or "", s.fraction, ctx.tokenizer, "tokens"))
        items.append((x, i, Plan(context=ctx.render(x, None), n=s.samples, prefix=prefix)))
    traces = generate_plans(items, ctx, seed=parts.cfg.train.seed + 17)
    score(traces, ctx)
    keep = [c for c in traces if c.reward >= CORRECT]
    for c in keep:
        c.loss_mask = None  # the whole verified trace is the SFT target
        c.logprobs = [0.0] * len(c.ids)
        c.sft = True
    return keep


def run_sft_stage(parts: "Parts", s: SFTStage) -> dict[str, float]:
    """SFT the policy on the kept traces (token-mean NLL, AdamW at `s.lr`). -> metrics."""
    traces = collect_traces(parts, s)
    if not traces:
        return {"sft/traces": 0.0}
    opt = torch.optim.AdamW(parts.params, lr=s.lr)
    gen = torch.Generator().manual_seed(parts.cfg.train.seed)
    losses = []
    parts.model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(traces), generator=gen).tolist()
        for start in range(0, len(order), s.batch_size):
            chunk = [traces[i] for i in order[start : start + s.batch_size]]
            b = collate(chunk, parts.tokenizer.pad_token_id).to(parts.engine.device)
            lp = policy_outputs(parts.model, b, cascade=parts.objective.cascade).logprobs  # (B, R)
            loss = -(lp * b.mask).sum() / b.mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {"sft/traces": float(len(traces)), "sft/loss_first": losses[0], "sft/loss_last": losses[-1]}
