"""Mixed precision (`model.autocast: bfloat16`): the trunk's matmuls in bf16 under torch.autocast,
weights / optimizer state / LM head / log-probs in float32 (CPU autocast; the CUDA one is in
tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guidedrl.trainer.batch import collate
from guidedrl.core.config import ModelConfig, RolloutConfig, TinyModel, load_config
from guidedrl.core.errors import ConfigError
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.nn.models import load_policy, render_prompt, trunk_and_head
from guidedrl.rollout.base import Generation, GenRequest
from guidedrl.guidance.protocol import Plan
from guidedrl.nn.prompts import Renderer
from guidedrl.trainer.collect import to_completion
from guidedrl.rollout.hf import HFEngine
from guidedrl.core.types import Sample

TINY = TinyModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _pair():
    """(fp32 model, the same weights with autocast on, tokenizer)."""
    plain, tok = load_policy(ModelConfig(path="tiny", tiny=TINY))
    mixed, _ = load_policy(ModelConfig(path="tiny", tiny=TINY, autocast="bfloat16"))
    mixed.load_state_dict(plain.state_dict())
    return plain, mixed, tok


def _batch(tok):
    """2 prompts of unequal length x 3 responses of 3, 5 and 7 tokens (equal adjacent groups)."""
    answer = tok(" the answer is 7, so it is 7", add_special_tokens=False)["input_ids"]
    comps = []
    for i, p in enumerate(["What is 2+3?", "Start at 3. Add 4. Times 2."]):
        ctx = render_prompt(tok, Sample(id=str(i), prompt=p), chat=True)
        for j in range(3):
            ids = answer[: 3 + 2 * j]
            gen = Generation(ids=ids, logprobs=[0.0] * len(ids), text="", finish_reason="length")
            comps.append(to_completion(Sample(id=str(i), prompt=p), i, Plan(gen_context=ctx, n=1), gen, Renderer(tok, chat=False)))
    return collate(comps, tok.pad_token_id)


def test_the_trunk_computes_in_bf16_while_weights_head_and_logprobs_stay_fp32() -> None:
    plain, mixed, tok = _pair()
    trunk, head = trunk_and_head(mixed)
    seen: dict[str, torch.dtype] = {}

    def record(name: str, get=lambda o: o):  # a hook that returns None leaves the output as it is
        return lambda m, i, o: seen.update({name: get(o).dtype}) and None

    hooks = [trunk.layers[0].self_attn.q_proj.register_forward_hook(record("q_proj")),
             trunk.register_forward_hook(record("trunk", lambda o: o.last_hidden_state)),
             head.register_forward_hook(record("head"))]
    b = _batch(tok)
    lp_mixed = policy_outputs(mixed, b).logprobs  # (B, R)
    for h in hooks:
        h.remove()
    assert seen == {"q_proj": torch.bfloat16, "trunk": torch.float32, "head": torch.float32}
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    lp_plain = policy_outputs(plain, b).logprobs
    diff = ((lp_mixed - lp_plain).abs() * b.mask).max().item()
    # bf16 keeps 8 bits of mantissa: the matmuls move log-probs by ~1e-3 here, not by 0 and not by 0.1
    assert 1e-6 < diff < 3e-2
    lp_mixed.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in mixed.parameters())


def test_a_small_step_moves_fp32_master_weights_where_bf16_weights_round_it_away() -> None:
    """Why mixed precision: one AdamW step of lr 1e-5 (each weight moves by ~1e-5) on weights of
    magnitude ~0.02, whose bf16 spacing is 2^-13 = 1.2e-4: bf16 weights mostly keep their value."""
    moved = {}
    for dtype, autocast in (("bfloat16", "none"), ("float32", "bfloat16")):
        model, tok = load_policy(ModelConfig(path="tiny", tiny=TINY, dtype=dtype, autocast=autocast))
        w = model.model.layers[0].mlp.up_proj.weight
        before = w.detach().clone()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        b = _batch(tok)
        policy_outputs(model, b).logprobs.sum().backward()
        opt.step()
        moved[dtype] = (w.detach() != before).float().mean().item()
    assert moved["float32"] > 0.99
    assert moved["bfloat16"] < 0.5


@pytest.mark.parametrize("lr", [1e-3, 1e-4, 1e-5, 1e-6])
def test_the_estimated_share_of_weights_a_step_moves_matches_a_real_adamw_step(lr: float) -> None:
    from guidedrl.trainer.build import share_moved_by_step

    model, _ = load_policy(ModelConfig(path="tiny", tiny=TINY, dtype="bfloat16"))
    params = [p for p in model.parameters() if p.requires_grad]
    est = share_moved_by_step(params, lr)
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    torch.optim.AdamW(params, lr=lr, weight_decay=0.0).step()  # a first step moves each weight by lr
    real = sum(int((p.detach() != b).sum()) for p, b in zip(params, before, strict=True)) / sum(p.numel() for p in params)
    assert abs(est - real) < 0.02, (est, real)
    assert share_moved_by_step([nn.Parameter(p.detach().float()) for p in params], lr) == 1.0  # float32 masters


@pytest.mark.parametrize("dtype,autocast,warns", [("bfloat16", "none", True), ("auto", "bfloat16", False),
                                                  ("float32", "none", False)])
def test_bf16_weights_at_an_lr_their_precision_rounds_away_get_a_warning(dtype: str, autocast: str, warns: bool) -> None:
    import warnings

    from guidedrl.trainer.build import build

    cfg = load_config(None, ["model.path=tiny", f"model.dtype={dtype}", f"model.autocast={autocast}", "data.eval=null",
                             "eval.enabled=false", "run.progress=false", "train.lr=1e-5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(cfg)
    msgs = [str(w.message) for w in caught if "train.lr" in str(w.message)]
    assert bool(msgs) == warns, msgs
    if warns:  # the tiny model's init: about a sixth of its bf16 weights move at lr 1e-5
        assert "model.autocast=bfloat16" in msgs[0] and "at most about 1" in msgs[0], msgs[0]


def test_shared_prompt_and_cascade_forwards_agree_under_autocast() -> None:
    """The update's shared-prompt forwards (sdpa over the expanded cache; cascade attention, which
    casts q, k, v to bf16 as sdpa does under autocast) give the plain forward's log-probs and
    gradients to bf16 precision."""
    _, mixed, tok = _pair()
    b = _batch(tok)
    out = {}
    for name, kw in (("plain", dict(share_prompts=False)), ("shared", dict(share_prompts=True, cascade=False)),
                     ("cascade", dict(share_prompts=True, cascade=True))):
        mixed.zero_grad(set_to_none=True)
        lp = policy_outputs(mixed, b, **kw).logprobs  # (B, R)
        (lp * b.mask).sum().backward()
        out[name] = (lp.detach(), mixed.model.layers[0].self_attn.k_proj.weight.grad.clone())
    for name in ("shared", "cascade"):
        assert ((out[name][0] - out["plain"][0]).abs() * b.mask).max().item() < 3e-2
        rel = (out[name][1] - out["plain"][1]).norm() / out["plain"][1].norm()
        assert rel.item() < 5e-2


@pytest.mark.parametrize("compile_step,graph_forward", [(False, None), (True, None), (True, True)])
def test_decode_paths_agree_under_autocast(compile_step: bool, graph_forward: bool | None) -> None:
    """The static decode (its stores in bf16, as the trunk's values are; uncompiled, compiled as on
    CPU, or only its forward compiled in "reduce-overhead" mode as on CUDA) and the plain loop give
    the same greedy tokens, and behaviour log-probs match a fresh forward to bf16 precision."""
    _, mixed, tok = _pair()
    reqs = [GenRequest(render_prompt(tok, Sample(id=str(i), prompt=p), chat=True), n=3)
            for i, p in enumerate(["What is 2+3?", "Hi"])]
    cfg = dict(max_new_tokens=10, top_k=1)
    plain = [g for gs in HFEngine(mixed, tok, RolloutConfig(static_cache=False, **cfg)).generate(reqs, seed=0) for g in gs]
    eng = HFEngine(mixed, tok, RolloutConfig(static_cache=True, compile_decode=compile_step, **cfg))
    eng._static().graph_forward = graph_forward
    fast = [g for gs in eng.generate(reqs, seed=0) for g in gs]
    assert eng._static().compile_step == compile_step, "a failed compile fell back to the eager step"
    assert [g.ids for g in plain] == [g.ids for g in fast]
    comps = [to_completion(Sample(id="s", prompt=""), i // 3, Plan(gen_context=reqs[i // 3].context, n=1), g, Renderer(tok, chat=False))
             for i, g in enumerate(fast)]
    b = collate(comps, tok.pad_token_id)
    with torch.no_grad():
        fresh = policy_outputs(mixed, b).logprobs  # (B, R)
    behaviour = torch.zeros_like(fresh)
    for r, g in enumerate(fast):
        behaviour[r, : len(g.logprobs)] = torch.tensor(g.logprobs)
    assert ((fresh - behaviour).abs() * b.mask).max().item() < 2e-2


def test_autocast_with_low_precision_weights_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.autocast"):
        load_config(None, ["model.dtype=bfloat16", "model.autocast=bfloat16"])
    cfg = load_config(None, ["model.autocast=bfloat16"])
    assert cfg.model.dtype == "auto"  # resolves to float32 weights on every device


@pytest.mark.parametrize("lora", [False, True])
def test_a_training_step_runs_under_autocast_with_the_default_fast_paths(lora: bool) -> None:
    from guidedrl.trainer.build import build
    from guidedrl.trainer.loop import seed_everything
    from guidedrl.trainer.step import StepState, train_step

    cfg = load_config(None, ["model.path=tiny", "model.autocast=bfloat16", "data.eval=null", "eval.enabled=false",
                             "run.progress=false", "rollout.max_new_tokens=8", "rollout.group_size=4",
                             "train.prompts_per_step=2", "train.micro_batch_size=4",
                             "reward.terms=[{name: 'helpers_rewards:sevens'}]", *(["model.lora={r: 4}"] if lora else [])])
    seed_everything(0)
    parts = build(cfg)
    before = [p.detach().clone() for p in parts.optim.params]
    metrics, _ = train_step(parts, StepState())
    assert all(p.dtype == torch.float32 for p in parts.policy.model.parameters())
    assert metrics["reward/std"] > 0 and metrics["policy/grad_norm"] > 0 and abs(metrics["loss/policy"]) < 10
    # the rollouts' behaviour log-probs and the update's forward both run under autocast: ratio ~1
    assert abs(metrics["policy/ratio_mean"] - 1.0) < 2e-2, metrics["policy/ratio_mean"]
    moved = [not torch.equal(a, p) for a, p in zip(before, parts.optim.params, strict=True)]
    assert sum(moved) >= len(moved) / 2  # (LoRA's A matrices get no gradient while B is still 0)


def test_a_deepcopy_of_an_autocast_model_runs_its_own_weights() -> None:
    import copy

    _, mixed, tok = _pair()
    twin = copy.deepcopy(mixed)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    b = _batch(tok)
    a, c = policy_outputs(mixed, b).logprobs, policy_outputs(twin, b).logprobs
    assert ((a - c).abs() * b.mask).max().item() > 1e-3  # the copy's trunk runs the copy's weights
    seen = []
    h = twin.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype) and None)
    policy_outputs(twin, b)
    h.remove()
    assert seen == [torch.bfloat16] * len(seen) and seen  # and still under autocast
