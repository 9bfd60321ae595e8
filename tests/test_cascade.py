"""Cascade training attention (`guidedrl.nn.cascade`) against the attention it replaces.

- the autograd function vs sdpa over each row's [prompt; own] keys with an explicit mask: values
  and the gradients of queries, own keys / values and prompt keys / values (grouped KV heads,
  left-padded prompts, float32) to 1e-5;
- `response_hidden` with it vs the plain forward over every row's full sequence: log-probs and
  every parameter's gradient to 1e-5, and that it ran;
- the cases it must not take (unequal groups, a response mask with a hole, sliding-window models)
  fall back to the expanded-cache path with the same results.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from guidedrl.nn import cascade
from guidedrl.trainer.batch import collate
from guidedrl.nn.logprobs import response_hidden, token_logprobs
from guidedrl.core.types import Completion, Sample


def _reference(q, k, v, pk, pv, pmask, G):
    """sdpa over each row's own [prompt; response] keys: prompt copied to its G rows, explicit mask."""
    B, Hq, R, D = q.shape
    g = Hq // k.shape[1]
    kk = torch.cat([pk.repeat_interleave(G, 0), k], 2).repeat_interleave(g, 1)  # (B, Hq, P+R, D)
    vv = torch.cat([pv.repeat_interleave(G, 0), v], 2).repeat_interleave(g, 1)
    causal = torch.zeros(R, R).masked_fill(torch.ones(R, R, dtype=torch.bool).triu(1), float("-inf"))
    mask = torch.cat([pmask.repeat_interleave(G, 0).expand(B, 1, R, -1), causal.expand(B, 1, R, R)], -1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


@pytest.mark.parametrize("padded", [False, True])
def test_cascade_attention_equals_masked_attention_over_prompt_and_own_keys(padded: bool) -> None:
    torch.manual_seed(0)
    U, G, Hq, Hkv, R, P, D = 3, 4, 4, 2, 7, 5, 16
    B = U * G
    q = torch.randn(B, Hq, R, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, R, D, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(U, Hkv, P, D, requires_grad=True) for _ in range(2))
    pmask = torch.zeros(U, 1, 1, P)
    if padded:  # prompt 0 has 2 left-pad slots, prompt 2 has 4 (one real key left)
        pmask[0, ..., :2] = torch.finfo(torch.float32).min
        pmask[2, ..., :4] = torch.finfo(torch.float32).min
    ref = _reference(q, k, v, pk, pv, pmask, G)
    out = cascade.CascadeAttention.apply(q, k, v, pk, pv, pmask if padded else None, D**-0.5)
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), [q, k, v, pk, pv])
    g_new = torch.autograd.grad((out * w).sum(), [q, k, v, pk, pv])
    for name, a, b in zip("q k v pk pv".split(), g_new, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    if padded:  # a masked prompt key gets no gradient
        assert pk.grad is None and g_new[3][2, :, :4].abs().max() == 0


def _batch(groups: list[int], resp_lens: list[int], seed: int = 0):
    """Rows of len(groups) prompts of unequal length (left padding), groups[i] rows each."""
    rng = random.Random(seed)
    comps, lens = [], iter(resp_lens)
    for gi, n in enumerate(groups):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(3, 9))]
        for _ in range(n):
            m = next(lens)
            ids = [rng.randrange(3, 200) for _ in range(m)]
            comps.append(Completion(sample=Sample(id=str(gi), prompt=""), group=gi, gen_context=prompt, ids=ids,
                                    behaviour_logprobs=[-1.0] * m, text="", finish_reason="length"))
    return collate(comps, pad_id=0)


def _run(model, b, **kw):
    model.zero_grad()
    h = response_hidden(model, b, **kw)  # (B, R, H)
    lp, _, _ = token_logprobs(model.get_output_embeddings(), h, b.response_ids)
    weights = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0))
    (lp * b.response_mask * weights).sum().backward()
    return lp.detach() * b.response_mask, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b) -> None:
    assert torch.allclose(a[0], b[0], atol=1e-5)
    for name, g in a[1].items():
        assert torch.allclose(g, b[1][name], atol=1e-5), name


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = cascade.CascadeAttention.forward

    def counted(ctx, *args):
        calls.append(1)
        return orig(ctx, *args)

    monkeypatch.setattr(cascade.CascadeAttention, "forward", staticmethod(counted))
    return calls


def test_shared_prompt_forward_with_cascade_attention_equals_the_plain_forward(tiny, monkeypatch) -> None:
    model, _ = tiny
    b = _batch([4, 4, 4], [5, 1, 9, 9, 3, 9, 2, 7, 9, 9, 9, 4])  # ragged, right-padded responses
    calls = _count_calls(monkeypatch)
    plain = _run(model, b, share_prompts=False)
    assert not calls
    _assert_same(_run(model, b), plain)
    assert len(calls) == 2, "one cascade call per decoder layer"


@pytest.mark.parametrize("case", ["unequal groups", "hole in a response mask", "sliding window"])
def test_cases_cascade_must_not_take_fall_back_with_the_same_results(tiny, monkeypatch, case: str) -> None:
    model, _ = tiny
    b = _batch([3, 5] if case == "unequal groups" else [4, 4], [6, 2, 7, 7, 3, 7, 5, 1])
    if case == "hole in a response mask":
        b.attention_mask[0, b.prompt_len + 1] = 0  # row 0 (6 tokens): real, pad, real: causal masking alone would see the pad
    if case == "sliding window":
        monkeypatch.setattr(model.config, "use_sliding_window", True, raising=False)
    calls = _count_calls(monkeypatch)
    plain = _run(model, b, share_prompts=False)
    _assert_same(_run(model, b), plain)
    assert not calls


def test_supports_only_plain_causal_models() -> None:
    from transformers import LlamaConfig, Qwen2Config

    assert cascade.supports(LlamaConfig())
    assert cascade.supports(Qwen2Config(use_sliding_window=False))
    assert not cascade.supports(Qwen2Config(use_sliding_window=True))
    assert not cascade.supports(LlamaConfig(attention_dropout=0.1))

    class Other:
        model_type = "gemma2"

    assert not cascade.supports(Other())


def test_cascade_forward_in_bfloat16_is_close_to_the_plain_one(tiny, monkeypatch) -> None:
    model, _ = tiny
    model.to(torch.bfloat16)
    b = _batch([4, 4], [6, 2, 7, 7, 3, 7, 5, 1])  # left-padded prompts: a float32 mask with bf16 queries
    calls = _count_calls(monkeypatch)
    h_plain = response_hidden(model, b, share_prompts=False).float() * b.mask[..., None]
    h = response_hidden(model, b).float() * b.mask[..., None]
    assert len(calls) == 2 and torch.isfinite(h).all()
    assert (h - h_plain).abs().max() <= 0.05 * h_plain.abs().max()


def test_compiled_layers_with_cascade_attention_give_the_eager_results(tiny, monkeypatch) -> None:
    from guidedrl.nn.models import compile_layers

    model, _ = tiny
    b = _batch([4, 4, 4], [5, 1, 9, 9, 3, 9, 2, 7, 9, 9, 9, 4])
    eager = _run(model, b)
    assert compile_layers(model) == 2
    calls = _count_calls(monkeypatch)  # traced by dynamo: counted while compiling, not per run
    _assert_same(_run(model, b), eager)
    assert calls, "the compiled layers went through the cascade attention"


@pytest.mark.parametrize("on", [True, False])
def test_train_cascade_attention_config_picks_the_update_path(monkeypatch, on: bool) -> None:
    from guidedrl.core.config import load_config
    from guidedrl.trainer.build import build
    from guidedrl.trainer.loop import seed_everything
    from guidedrl.trainer.step import StepState, train_step

    calls = _count_calls(monkeypatch)
    cfg = load_config(None, ["model.path=tiny", "data.eval=null", "eval.enabled=false", "run.progress=false",
                             "rollout.max_new_tokens=6", "rollout.min_new_tokens=6", "rollout.group_size=4",
                             "train.prompts_per_step=2", "train.skip_inert_rows=false",
                             f"train.cascade_attention={str(on).lower()}"])
    seed_everything(0)
    metrics, _ = train_step(build(cfg), StepState())
    assert "loss/policy" in metrics, "the update ran"
    assert bool(calls) == on
