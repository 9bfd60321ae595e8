"""ReGFT's pre-RL stage: sample with a partial reference as the start of the response, keep the
verified-correct traces, SFT on them under the plain prompt (Wu et al. 2026)."""

from __future__ import annotations

import torch

from guidedrl.core.config import SFTStage
from guidedrl.core.types import CORRECT, Completion, Sample
from guidedrl.guidance.pieces import cut
from guidedrl.guidance.protocol import Plan
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.trainer.batch import collate
from guidedrl.trainer.build import Pieces


def collect_traces(p: Pieces, samples: list[Sample], s: SFTStage, seed: int) -> list[Completion]:
    """Verified-correct traces (reference prefix + own continuation), as SFT completions."""
    r = p.policy.renderer
    with_ref = [x for x in samples if x.reference][: s.max_problems]
    items = [(x, i, Plan(gen_context=r.render(x), n=s.samples,
                         prefix=r.encode(cut(x.reference or "", s.fraction, r.tokenizer, "tokens"))))
             for i, x in enumerate(with_ref)]
    keep = [c for cs in p.services.generate(items, seed=seed) for c in cs if c.reward >= CORRECT]
    for c in keep:
        c.loss_mask = None  # the whole verified trace is the SFT target
        c.behaviour_logprobs = [0.0] * len(c.ids)
        c.sft = True
    return keep


def run_sft_stage(p: Pieces, s: SFTStage) -> dict[str, float]:
    """SFT the policy on the kept traces (token-mean NLL, AdamW at `s.lr`). -> `sft/` metrics."""
    traces = collect_traces(p, p.selector.samples, s, seed=p.cfg.train.seed + 17)
    if not traces:
        return {"sft/traces": 0.0}
    model = p.policy.model
    opt = torch.optim.AdamW(p.optim.params, lr=s.lr)
    gen = torch.Generator().manual_seed(p.cfg.train.seed)
    losses = []
    model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(traces), generator=gen).tolist()
        for start in range(0, len(order), s.batch_size):
            chunk = [traces[i] for i in order[start : start + s.batch_size]]
            b = collate(chunk, p.policy.renderer.pad_id).to(p.engine.device)
            lp = policy_outputs(model, b, cascade=p.objective.cascade).logprobs  # (B, R)
            loss = -(lp * b.mask).sum() / b.mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {"sft/traces": float(len(traces)), "sft/loss_first": losses[0], "sft/loss_last": losses[-1]}
