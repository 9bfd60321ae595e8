"""Build everything a run needs from the config, once, in one pass, at the boundary (registries
are read here): the policy and its renderer, the reference, the engine, data, reward, guide,
objective and optimizer."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from guidedrl.core.config import Config
from guidedrl.core.types import Sample
from guidedrl.data import load_samples
from guidedrl.data.loaders import balanced_head
from guidedrl.data.select import UniformSelector
from guidedrl.data.tasks import default_reward
from guidedrl.guidance import build_guide
from guidedrl.guidance.protocol import Guide
from guidedrl.nn.models import compile_layers, load_model, load_policy, use_chat
from guidedrl.nn.prompts import Renderer
from guidedrl.rewards import build_reward
from guidedrl.rollout.hf import HFEngine
from guidedrl.rollout.weights import decode_copy
from guidedrl.trainer.collect import PolicyServices, RewardTimer
from guidedrl.trainer.memory import keep_freed_memory
from guidedrl.trainer.objective import Objective
from guidedrl.trainer.update import Optim


@dataclass(frozen=True)
class Policy:
    """The model being trained, how its prompts are rendered, and its critic head (PPO)."""

    model: nn.Module
    renderer: Renderer
    value_head: nn.Module | None


@dataclass(frozen=True)
class Pieces:
    """Everything a run needs, built by `build` in one pass."""

    cfg: Config
    policy: Policy
    ref: nn.Module | None
    engine: HFEngine
    services: PolicyServices
    selector: UniformSelector
    guide: Guide | None
    objective: Objective
    optim: Optim
    eval_samples: list[Sample]


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s: linear warmup, then constant / cosine / linear decay."""
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


def build_optimizer(cfg: Config, params: list[nn.Parameter]) -> Optim:
    """AdamW over `params` with the lr schedule of `train.schedule` (steps counted per optimizer step)."""
    t = cfg.train
    warn_if_steps_round_away(params, t.lr)
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, fused=fused or None)
    total = t.steps * cfg.algo.epochs * cfg.algo.minibatches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.schedule, t.warmup_steps, total))
    return Optim(params, opt, sched)


def build_value_head(model: nn.Module) -> nn.Module:
    """PPO's critic: a zero-initialized linear head on the trunk, registered on the model so that it
    is saved and restored with it."""
    head = nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.add_module("value_head", head)
    return head


def build(cfg: Config) -> Pieces:
    """Every piece of a run for `cfg`. Training on CPU with `train.keep_freed_memory` also sets the
    process's allocator to keep freed memory (`guidedrl.trainer.memory`)."""
    model, tok = load_policy(cfg.model)
    if cfg.train.keep_freed_memory and next(model.parameters()).device.type == "cpu":
        keep_freed_memory()
    cast = decode_copy(model, cfg.model, cfg.rollout)  # before compiling: the copy compiles apart
    if cfg.train.compile_model:
        compile_layers(model)
        if cast is not None:
            compile_layers(cast.module)
    renderer = Renderer(tok, chat=use_chat(cfg.model, tok), system_prompt=cfg.model.system_prompt)
    policy = Policy(model, renderer, build_value_head(model) if cfg.algo.value is not None else None)
    train = load_samples(cfg.data.train)
    evals = load_samples(cfg.data.eval, key="data.eval") if (cfg.data.eval is not None and cfg.eval.enabled) else []
    if cfg.eval.limit is not None:
        evals = balanced_head(evals, cfg.eval.limit)
    task = cfg.data.train.task if cfg.data.train.path is None else None
    reward = RewardTimer(build_reward(cfg.reward.terms, default_reward(task), cfg.reward.on_error))
    engine = HFEngine(model, tok, cfg.rollout, cast_weights=cast)
    params = [p for p in model.parameters() if p.requires_grad]
    return Pieces(
        cfg=cfg, policy=policy, ref=load_model(cfg.model, tok, trainable=False) if cfg.algo.kl.coef else None,
        engine=engine, services=PolicyServices(engine, renderer, reward, model, cfg.rollout.temperature),
        selector=UniformSelector(train, cfg.train.seed, cfg.data.shuffle), guide=build_guide(cfg, renderer),
        objective=Objective.from_config(cfg.algo, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                                        compiled=cfg.train.compile_logprobs, skip_inert=cfg.train.skip_inert_rows,
                                        cascade=cfg.train.cascade_attention),
        optim=build_optimizer(cfg, params), eval_samples=evals,
    )
