"""GPU paths (skipped without CUDA): the compiled static-cache decode (a CUDA graph) against the plain
loop, behaviour log-probs against a fresh forward, seeded determinism, fused AdamW, a bf16 step, a
mixed-precision (autocast) step, the CUDA-graph decode from the cast copy of the weights."""

from __future__ import annotations

import pytest
import torch

from guidedrl.trainer.batch import collate
from guidedrl.core.config import ModelConfig, RolloutConfig, TinyModel, load_config
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.nn.models import load_policy
from guidedrl.trainer.build import build
from guidedrl.rollout.base import GenRequest
from guidedrl.guidance.protocol import Plan
from guidedrl.nn.prompts import Renderer
from guidedrl.trainer.collect import to_completion
from guidedrl.rollout.hf import HFEngine
from guidedrl.trainer.loop import seed_everything
from guidedrl.trainer.step import StepState, train_step
from guidedrl.core.types import Sample

pytestmark = pytest.mark.gpu


@pytest.fixture()
def cuda_fp32():
    """A 2-layer random model on CUDA in float32 (so log-probs can be compared at 1e-4)."""
    cfg = ModelConfig(path="tiny", device="cuda", dtype="float32",
                      tiny=TinyModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
    return load_policy(cfg)


def _reqs(n: int = 4) -> list[GenRequest]:
    return [GenRequest(list(range(10, 10 + k)), n=n) for k in (5, 9, 14)]  # unequal lengths: left padding


def test_compiled_static_decode_is_greedy_equal_to_the_plain_loop(cuda_fp32) -> None:
    model, tok = cuda_fp32
    plain = HFEngine(model, tok, RolloutConfig(max_new_tokens=24, top_k=1, static_cache=False)).generate(_reqs(), seed=0)
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=24, top_k=1, static_cache=True))
    fast = eng.generate(_reqs(), seed=0)
    assert eng._static_decoder is not None and eng._static_decoder.compile_step, "the compiled path did not run"
    for gp, gf in zip(plain, fast, strict=True):
        for a, b in zip(gp, gf, strict=True):
            assert a.ids == b.ids and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_compiled_static_logprobs_match_a_fresh_forward_and_are_seeded(cuda_fp32) -> None:
    model, tok = cuda_fp32
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=20, temperature=0.8, static_cache=True))
    reqs = _reqs(3)
    out = eng.generate(reqs, seed=5)
    again = eng.generate(reqs, seed=5)  # second call replays the recorded graph
    other = eng.generate(reqs, seed=6)
    ids = lambda o: [x.ids for g in o for x in g]  # noqa: E731
    assert ids(out) == ids(again) and ids(out) != ids(other)
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id).to("cuda")
    with torch.no_grad():
        lp = policy_outputs(model, b, temperature=0.8).logprobs
    assert torch.allclose(lp * b.response_mask, b.behaviour_logprobs, atol=1e-4)


def test_static_decode_stops_at_eos_and_forces_min_tokens(cuda_fp32) -> None:
    model, tok = cuda_fp32
    bias = torch.zeros(model.config.vocab_size, device="cuda")
    bias[tok.eos_token_id] = 4.0  # eos likely at every step
    h = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        free = HFEngine(model, tok, RolloutConfig(max_new_tokens=40, static_cache=True)).generate(_reqs(), seed=0)
        forced = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, min_new_tokens=12, static_cache=True)).generate(
            _reqs(), seed=0)
    finally:
        h.remove()
    ended = [x for g in free for x in g if x.finish_reason == "eos"]
    assert ended and all(x.ids[-1] == tok.eos_token_id and tok.eos_token_id not in x.ids[:-1] for x in ended)
    assert all(len(x.ids) == 12 and x.finish_reason == "length" for g in forced for x in g)


def test_bf16_train_step_on_gpu_uses_fused_adamw_and_changes_weights() -> None:
    cfg = load_config(None, [
        "model.path=tiny", "model.device=cuda", "data.eval=null", "eval.enabled=false", "run.progress=false",
        "rollout.max_new_tokens=16", "rollout.group_size=4", "train.prompts_per_step=2", "train.lr=1e-3",
        "reward.terms=[{name: regex_format, args: {pattern: e}}]", "data.train.task=arith",
    ])
    seed_everything(0)
    parts = build(cfg)
    assert next(parts.policy.model.parameters()).dtype == torch.bfloat16
    assert parts.optim.optimizer.defaults.get("fused") is True
    before = [p.detach().clone() for p in parts.optim.params]
    metrics, flat = train_step(parts, StepState())
    assert flat and torch.isfinite(torch.tensor(metrics["loss/policy"]))
    assert sum(not torch.equal(a, p) for a, p in zip(before, parts.optim.params, strict=True)) >= 0.9 * len(before)


def test_autocast_step_on_gpu_keeps_fp32_weights_and_agrees_with_its_rollouts() -> None:
    """`model.autocast=bfloat16` on CUDA: the CUDA-graph decode and the update both under autocast,
    float32 weights and fused AdamW, behaviour log-probs consistent with the update (ratio ~1)."""
    cfg = load_config(None, [
        "model.path=tiny", "model.device=cuda", "model.autocast=bfloat16", "data.eval=null", "eval.enabled=false",
        "run.progress=false", "rollout.max_new_tokens=16", "rollout.group_size=4", "train.prompts_per_step=2",
        "train.lr=1e-3", "reward.terms=[{name: regex_format, args: {pattern: e}}]", "data.train.task=arith",
    ])
    seed_everything(0)
    parts = build(cfg)
    assert next(parts.policy.model.parameters()).dtype == torch.float32
    metrics, flat = train_step(parts, StepState())
    assert flat and torch.isfinite(torch.tensor(metrics["loss/policy"]))
    assert abs(metrics["ratio_mean"] - 1.0) < 2e-2


def test_cuda_graph_decode_from_the_cast_copy_follows_weight_changes() -> None:
    """`rollout.cast_weights_once` on CUDA: the CUDA-graph decode holds the copy's addresses, so the
    in-place re-cast after a weight change must reach the replayed graph. Greedy tokens equal the
    eager decode that casts every step, before and after the policy's weights change."""
    from guidedrl.rollout.weights import CastWeights

    model, tok = load_policy(ModelConfig(path="tiny", device="cuda", autocast="bfloat16",
                                         tiny=TinyModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)))
    cfg = RolloutConfig(max_new_tokens=20, top_k=1, static_cache=True)
    every = HFEngine(model, tok, cfg.model_copy(update={"compile_decode": False}))
    cw = CastWeights(model, torch.bfloat16)
    once = HFEngine(model, tok, cfg, cast_weights=cw)
    outs = []
    for round_ in range(2):
        if round_:
            with torch.no_grad():
                for p in model.model.layers.parameters():
                    p.mul_(1.5)
        a = [g.ids for gs in every.generate(_reqs(), seed=0) for g in gs]
        b = [g.ids for gs in once.generate(_reqs(), seed=0) for g in gs]
        assert a == b, round_
        outs.append(b)
    assert once._static().compile_step and once._static().model is cw.module
    assert outs[0] != outs[1]  # the replayed graph decoded with the changed weights
