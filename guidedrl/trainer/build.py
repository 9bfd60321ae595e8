"""Build everything a run needs from the config, once, at the boundary (registries are read here)."""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from guidedrl.core.config import Config
from guidedrl.data import load_samples
from guidedrl.data.loaders import balanced_head
from guidedrl.data.tasks import default_reward
from guidedrl.trainer.memory import keep_freed_memory
from guidedrl.nn.models import compile_layers, load_model, load_policy, render_prompt, use_chat
from guidedrl.rewards import build_reward
from guidedrl.rollout.collect import Guide, RolloutContext
from guidedrl.rollout.hf import HFEngine
from guidedrl.rollout.weights import decode_copy
from guidedrl.data.select import UniformSelector
from guidedrl.core.types import Sample
from guidedrl.trainer.update import Objective


class RewardTimer:
    """Wraps the reward call to time it separately from generation."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def __call__(self, samples: list[Sample], texts: list[str]) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(samples, texts)
        finally:
            self.seconds += time.perf_counter() - t0


@dataclass
class Parts:
    cfg: Config
    model: nn.Module
    tokenizer: Any
    ref: nn.Module | None
    value_head: nn.Module | None
    engine: HFEngine
    ctx: RolloutContext
    selector: UniformSelector
    guide: Guide | None
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    reward_timer: RewardTimer
    eval_samples: list[Sample]
    chat: bool
    last_ids: list[str] = field(default_factory=list)

    def render(self, sample: Sample, hint: str | None = None) -> list[int]:
        return render_prompt(self.tokenizer, sample, chat=self.chat, system_prompt=self.cfg.model.system_prompt, hint=hint)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s: linear warmup, then constant / cosine / linear decay."""
    import math

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac

    return f


def share_moved_by_step(params: list[nn.Parameter], lr: float, sample: int = 65536) -> float:
    """The share of the weights an AdamW step of size ~lr changes at their dtype's precision.

    Adam's step moves each weight by about lr whatever its gradient's scale; stored in bf16 (8 bits
    of mantissa), a weight w keeps its value when the step is under half its spacing,
    2^floor(log2 |w|) * eps / 2 (eps = 2^-7). Float32 weights (eps 1.2e-7) move for any lr in use.
    Adam's later steps can be smaller than lr, so this is the most that moves. Estimated on the first
    `sample` entries of each parameter. -> share in [0, 1] (1.0 with no parameters)."""
    moved, total = 0, 0
    for p in params:
        w = p.detach().flatten()[:sample].float()
        _, exp = torch.frexp(w)  # w = m * 2^exp with |m| in [0.5, 1): 2^floor(log2 |w|) = 2^(exp - 1)
        half_spacing = torch.ldexp(torch.full_like(w, torch.finfo(p.dtype).eps / 2), exp - 1).masked_fill(w == 0, 0.0)
        moved += int((half_spacing < lr).sum())
        total += w.numel()
    return moved / total if total else 1.0


def warn_if_steps_round_away(params: list[nn.Parameter], lr: float) -> None:
    """Warn when the trainable weights' dtype rounds most lr-sized steps away (bf16 weights at a
    typical RL lr of 1e-6 to 1e-5: the run would look like it trains while most weights stay put)."""
    share = share_moved_by_step(params, lr)
    if share < 0.9:
        warnings.warn(
            f"train.lr={lr:g}: with {params[0].dtype} weights an optimizer step changes at most about "
            f"{share:.0%} of the trainable weights (the rest round to their old value); set "
            "model.autocast=bfloat16 for float32 master weights with bf16 compute, or model.dtype=float32",
            UserWarning, stacklevel=2,
        )


def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
    t = cfg.train
    warn_if_steps_round_away(params, t.lr)
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, fused=fused or None)
    total = t.steps * cfg.algo.epochs * cfg.algo.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, t.warmup_steps, total))
    return opt, sched


def make_logprob_fn(model: nn.Module, tokenizer: Any, temperature: float) -> Callable[[list[int], list[int]], list[float]]:
    """(context ids, response ids) -> the policy's current log-prob of each response token."""
    from guidedrl.trainer.batch import collate
    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.core.types import Completion

    @torch.no_grad()
    def fn(context: list[int], ids: list[int]) -> list[float]:
        if not ids:
            return []
        c = Completion(sample=Sample(id="_", prompt=""), group=0, prompt_ids=context, ids=ids,
                       logprobs=[0.0] * len(ids), text="", finish_reason="eos")
        b = collate([c], tokenizer.pad_token_id).to(next(model.parameters()).device)
        was = model.training
        model.eval()
        lp = policy_outputs(model, b, temperature=temperature).logprobs[0, : len(ids)]
        model.train(was)
        return lp.float().cpu().tolist()

    return fn


def build_parts(cfg: Config, guide: Guide | None = None) -> Parts:
    """Model, tokenizer, reference, engine, data, reward, guide, objective and optimizer for `cfg`.

    Training on CPU with `train.keep_freed_memory` also sets the process's allocator to keep freed
    memory (`guidedrl.trainer.memory`)."""
    from guidedrl.guidance import build_guide

    model, tok = load_policy(cfg.model)
    if cfg.train.keep_freed_memory and next(model.parameters()).device.type == "cpu":
        keep_freed_memory()
    cast = decode_copy(model, cfg.model, cfg.rollout)  # before compiling: the copy compiles apart
    if cfg.train.compile_model:
        compile_layers(model)
        if cast is not None:
            compile_layers(cast.module)
    chat = use_chat(cfg.model, tok)
    ref = load_model(cfg.model, tok, trainable=False) if cfg.algo.kl.coef else None
    value_head = None
    if cfg.algo.value is not None:
        hidden = model.config.hidden_size
        value_head = nn.Linear(hidden, 1).to(next(model.parameters()).device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        model.add_module("value_head", value_head)  # saved and restored with the model
    train = load_samples(cfg.data.train)
    evals = load_samples(cfg.data.eval) if (cfg.data.eval is not None and cfg.eval.enabled) else []
    if cfg.eval.limit is not None:
        evals = balanced_head(evals, cfg.eval.limit)
    task = cfg.data.train.task if cfg.data.train.path is None else None
    reward = RewardTimer(build_reward(cfg.reward.terms, default_reward(task), cfg.reward.on_error))
    engine = HFEngine(model, tok, cfg.rollout, cast_weights=cast)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = build_optimizer(cfg, params)
    parts = Parts(
        cfg=cfg, model=model, tokenizer=tok, ref=ref, value_head=value_head, engine=engine, ctx=None,  # type: ignore[arg-type]
        selector=UniformSelector(train, cfg.train.seed, cfg.data.shuffle), guide=None,
        objective=Objective.from_config(cfg.algo, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                                        compiled=cfg.train.compile_logprobs, skip_inert=cfg.train.skip_inert_rows,
                                        cascade=cfg.train.cascade_attention),
        optimizer=opt, scheduler=sched, params=params, reward_timer=reward, eval_samples=evals, chat=chat,
    )
    parts.ctx = RolloutContext(engine=engine, tokenizer=tok, render=parts.render, reward=reward,
                               group_size=cfg.rollout.group_size, total_steps=max(1, cfg.train.steps), seed=cfg.train.seed,
                               rng=random.Random(cfg.train.seed),
                               logprobs=make_logprob_fn(model, tok, cfg.rollout.temperature))
    parts.guide = guide if guide is not None else build_guide(cfg)
    return parts
