"""Worker for tests/test_dist.py: one process of a 2-process gloo group (or the whole batch alone).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/helpers_dist.py OUT

Builds the same tiny model and the same rollout batch as every other process, keeps this process's
contiguous half of the groups, runs one `optimizer_step` (SGD, lr 0: the weights stay, the summed
gradients are read) and saves the gradients to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def batch_and_model():  # type: ignore[no-untyped-def]
    """(model, full batch with advantages): identical in every process (seeded)."""
    from guidedrl.trainer.batch import collate
    from guidedrl.core.config import ModelConfig, RolloutConfig, TinyModel
    from guidedrl.nn.models import load_policy, render_prompt
    from guidedrl.rollout.base import GenRequest
    from guidedrl.guidance.protocol import Plan
    from guidedrl.nn.prompts import Renderer
    from guidedrl.trainer.collect import to_completion
    from guidedrl.rollout.hf import HFEngine
    from guidedrl.core.types import Sample

    torch.manual_seed(0)
    model, tok = load_policy(ModelConfig(path="tiny", tiny=TinyModel(hidden_size=64, num_layers=2, num_heads=4,
                                                                     num_kv_heads=2)))
    prompts = ["What is 2+3?", "Hi", "Start at 3. Add 4. Times 2.", "Go"]  # unequal lengths
    reqs = [GenRequest(render_prompt(tok, Sample(id=str(i), prompt=p), chat=True), n=3) for i, p in enumerate(prompts)]
    out = HFEngine(model, tok, RolloutConfig(max_new_tokens=9, temperature=1.0)).generate(reqs, seed=11)
    comps = [to_completion(Sample(id=str(i), prompt=""), i, Plan(gen_context=reqs[i].context, n=1), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    b.advantages = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(1)) * b.mask  # (B, R)
    return model, b


def gradients(rank: int, world: int) -> list[torch.Tensor]:
    """One optimizer step's (summed) gradients from this process's share of the batch."""
    from guidedrl.core.config import AlgoConfig
    from guidedrl.trainer.objective import Objective
    from guidedrl.trainer.update import Optim, optimizer_step

    model, b = batch_and_model()
    per = len(b) // world  # 12 rows = 4 groups of 3: each process gets whole groups
    mine = b.select(list(range(rank * per, (rank + 1) * per)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    obj = Objective.from_config(AlgoConfig(), temperature=1.0, max_new_tokens=9)  # GRPO: seq-mean-token-mean
    _, finite = optimizer_step(model, Optim(params, opt, sched), obj, mine, micro_batch_size=2, grad_clip=None)
    assert finite
    return [p.grad.clone() for p in params]


if __name__ == "__main__":
    from guidedrl.core import dist

    assert dist.init_from_env(), "run with WORLD_SIZE > 1"
    grads = gradients(dist.rank(), dist.world_size())
    torch.save(grads, sys.argv[1])
    dist.shutdown()
