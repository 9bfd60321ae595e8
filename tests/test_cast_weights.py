"""`rollout.cast_weights_once`: under autocast the rollouts decode from a copy of the trunk's linear
weights in bf16, cast once per update instead of once per token; the same numbers as casting every
step (guidedrl.rollout.weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guidedrl.core.config import ModelConfig, RolloutConfig, TinyModel, load_config
from guidedrl.nn.models import load_policy, render_prompt, trunk_and_head
from guidedrl.rollout.base import GenRequest
from guidedrl.rollout.hf import HFEngine
from guidedrl.rollout.weights import CastWeights
from guidedrl.core.types import Sample

TINY = TinyModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def _mixed(**kw):
    return load_policy(ModelConfig(path="tiny", tiny=TINY, autocast="bfloat16", **kw))


def _reqs(tok) -> list[GenRequest]:
    return [GenRequest(render_prompt(tok, Sample(id=str(i), prompt=p), chat=True), n=3)
            for i, p in enumerate(["What is 2+3?", "Start at 3. Add 4."])]


def _linears(model: nn.Module) -> list[nn.Linear]:
    trunk, _ = trunk_and_head(model)
    return [m for m in trunk.modules() if isinstance(m, nn.Linear)]


def test_the_copy_casts_the_trunks_linears_and_shares_every_other_tensor() -> None:
    model, _ = _mixed()
    cw = CastWeights(model, torch.bfloat16)
    src, dst = _linears(model), _linears(cw.module)
    assert len(src) == len(dst) == 2 * 7  # q, k, v, o, gate, up, down a layer
    for a, b in zip(src, dst, strict=True):
        assert b.weight.dtype == torch.bfloat16 and not b.weight.requires_grad
        assert torch.equal(b.weight, a.weight.detach().to(torch.bfloat16))  # Tensor.to's rounding, as autocast's
        assert b.weight.data_ptr() != a.weight.data_ptr()
    cast_ids = {id(m.weight) for m in dst}
    shared = [p for p in cw.module.parameters() if id(p) not in cast_ids]
    policy_ids = {id(p) for p in model.parameters()}
    # embeddings (tied to the LM head) and norms are the policy's own float32 tensors, not copies
    assert shared and all(id(p) in policy_ids and p.dtype == torch.float32 for p in shared)
    _, head = trunk_and_head(cw.module)
    assert head.weight is trunk_and_head(model)[1].weight
    # 64x64 q and o, 64x32 k and v (2 KV heads of 16), 3 of 64x128 in the MLP, in 2 bytes, 2 layers
    assert cw.extra_bytes() == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) * 2


@pytest.mark.parametrize("static,compiled", [(False, False), (True, False), (True, True)])
def test_decoding_from_the_copy_gives_the_tokens_and_logprobs_of_casting_every_step(static: bool, compiled: bool) -> None:
    """Twice: the second time after the policy's weights changed in place, as an update changes them,
    with the same engine (its static buffers and compiled step, holding the copy's weights, reused)."""
    model, tok = _mixed()
    cfg = RolloutConfig(max_new_tokens=16, temperature=1.0, static_cache=static, compile_decode=compiled)
    # the reference casts every step, eagerly (one compile in the test, not two)
    every = HFEngine(model, tok, cfg.model_copy(update={"compile_decode": False}))
    cw = CastWeights(model, torch.bfloat16)
    once = HFEngine(model, tok, cfg, cast_weights=cw)
    firsts = []
    for round_ in range(2):
        if round_:
            with torch.no_grad():
                for m in _linears(model):
                    m.weight.mul_(1.5)  # sharper distributions: other samples
        seen: list[torch.dtype] = []
        hook = None if compiled else _linears(cw.module)[0].register_forward_hook(
            lambda m, i, o: seen.append(o.dtype) and None)  # (a hook in a compiled step is a guard: recompiles)
        b = [g for gs in once.generate(_reqs(tok), seed=3) for g in gs]
        if hook is not None:
            hook.remove()
            assert seen and set(seen) == {torch.bfloat16}  # the copy ran, under autocast
        if static:
            assert once._static().model is cw.module
        a = [g for gs in every.generate(_reqs(tok), seed=3) for g in gs]
        assert [g.ids for g in a] == [g.ids for g in b]
        assert len({tuple(g.ids) for g in a}) == len(a)  # sampled at temperature 1: every row its own tokens
        if compiled:  # against the eager step (one compile, not two): inductor's fusions round bf16 its own way
            assert max(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p.logprobs, q.logprobs)) < 2e-2
        else:  # the same bf16 operands reach the same kernels: equal, not merely close
            assert [g.logprobs for g in a] == [g.logprobs for g in b]
        firsts.append([g.ids for g in b])
    assert firsts[0] != firsts[1]  # the second round sampled from the changed weights


@pytest.mark.parametrize("fused", [False, True])
def test_the_copy_follows_optimizer_steps_fused_or_not_and_writes_through_data(fused: bool) -> None:
    model, tok = _mixed()
    cw = CastWeights(model, torch.bfloat16)
    src, dst = _linears(model), _linears(cw.module)
    opt = torch.optim.AdamW([m.weight for m in src[:3]], lr=1e-2, fused=fused, foreach=None if fused else True)
    for m in src[:3]:
        m.weight.grad = torch.randn_like(m.weight)
    before = [m.weight._version for m in src]
    opt.step()
    # why the copy is re-cast on every call rather than when a version counter moved: a fused step
    # moves weights without bumping their counters
    assert any(m.weight._version != v for m, v in zip(src, before, strict=True)) == (not fused)
    assert not any(torch.equal(b.weight, a.weight.detach().to(torch.bfloat16)) for a, b in zip(src[:3], dst[:3]))
    assert cw.refresh() is cw.module
    assert all(torch.equal(b.weight, a.weight.detach().to(torch.bfloat16)) for a, b in zip(src, dst, strict=True))
    src[5].weight.data.mul_(0.5)  # as a distributed broadcast into .data writes
    cw.refresh()
    assert torch.equal(dst[5].weight, src[5].weight.detach().to(torch.bfloat16))


def test_the_copy_of_a_lora_policy_follows_its_adapters() -> None:
    model, tok = _mixed(lora={"r": 4})
    cw = CastWeights(model, torch.bfloat16)
    cfg = RolloutConfig(max_new_tokens=12, static_cache=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at 0: give the adapters an effect
    every = HFEngine(model, tok, cfg).generate(_reqs(tok), seed=1)
    once = HFEngine(model, tok, cfg, cast_weights=cw).generate(_reqs(tok), seed=1)
    assert [[g.logprobs for g in gs] for gs in every] == [[g.logprobs for g in gs] for gs in once]


def test_with_compiled_layers_the_copys_layers_are_compiled_too() -> None:
    from guidedrl.trainer.build import build

    cfg = load_config(None, ["model.path=tiny", "model.autocast=bfloat16", "data.eval=null", "eval.enabled=false",
                             "run.progress=false", "train.compile_model=true"])
    parts = build(cfg)
    for net in (parts.policy.model, parts.engine.cast_weights.module):
        layers = trunk_and_head(net)[0].layers
        assert all(layer._compiled_call_impl is not None for layer in layers)


@pytest.mark.parametrize("on", [True, False])
def test_training_parts_decode_from_the_copy_under_autocast_unless_turned_off(on: bool) -> None:
    from guidedrl.trainer.build import build
    from guidedrl.trainer.loop import seed_everything
    from guidedrl.trainer.step import StepState, train_step

    cfg = load_config(None, ["model.path=tiny", "model.autocast=bfloat16", "data.eval=null", "eval.enabled=false",
                             "run.progress=false", "rollout.max_new_tokens=8", "rollout.group_size=4",
                             "train.prompts_per_step=2", "train.micro_batch_size=4",
                             f"rollout.cast_weights_once={str(on).lower()}",
                             "reward.terms=[{name: 'helpers_rewards:sevens'}]"])
    seed_everything(0)
    parts = build(cfg)
    assert (parts.engine.cast_weights is not None) == on
    metrics, _ = train_step(parts, StepState())
    assert metrics["policy/grad_norm"] > 0 and abs(metrics["policy/ratio_mean"] - 1.0) < 2e-2, metrics["policy/ratio_mean"]
    if on:  # the next rollout decodes with the stepped weights
        cw = parts.engine.cast_weights
        cw.refresh()
        assert all(torch.equal(b.weight, a.weight.detach().to(torch.bfloat16))
                   for a, b in zip(_linears(parts.policy.model), _linears(cw.module), strict=True))
    assert load_config(None, ["model.path=tiny"]).rollout.cast_weights_once  # on by default (only acts under autocast)
