"""The plain loop's CPU decode attention (`plain_decode_attention`: one-token queries as grouped
matmuls) against torch's sdpa, which it replaces in the decode steps only."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from guidedrl.core.config import ModelConfig, RolloutConfig, TinyModel
from guidedrl.nn.models import load_policy, render_prompt
from guidedrl.rollout import hf
from guidedrl.rollout.base import GenRequest
from guidedrl.rollout.hf import HFEngine, plain_decode_attention
from guidedrl.core.types import Sample


class _Attn(nn.Module):
    """What transformers' attention functions read from the module."""

    num_key_value_groups = 3
    is_causal = True
    training = False


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 6, 1, 16, generator=g, dtype=dtype)  # (B, Hq, 1, D): 6 query heads over 2 KV heads
    k = torch.randn(4, 2, 9, 16, generator=g, dtype=dtype)  # (B, Hkv, L, D)
    v = torch.randn(4, 2, 9, 16, generator=g, dtype=dtype)
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False  # rows 1 and 3 left-padded
    mask[3, ..., :5] = False
    return q, k, v, mask


@pytest.mark.parametrize("masked", [True, False])
def test_one_token_queries_match_sdpa_over_repeated_kv_heads(masked: bool) -> None:
    q, k, v, mask = _qkv()
    m = mask if masked else None
    ours, _ = plain_decode_attention(_Attn(), q, k, v, m)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, m)
    assert ours.shape == ref.shape == (4, 1, 6, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    if masked:  # padding gets no weight: changing padded keys and values changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, :, :3] += 5.0
        v2[3, :, :5] -= 7.0
        torch.testing.assert_close(plain_decode_attention(_Attn(), q, k2, v2, mask)[0], ours, rtol=0, atol=0)


def test_an_additive_float_mask_works_as_the_bool_one() -> None:
    q, k, v, mask = _qkv()
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # (B, 1, 1, L)
    torch.testing.assert_close(plain_decode_attention(_Attn(), q, k, v, additive)[0],
                               plain_decode_attention(_Attn(), q, k, v, mask)[0], rtol=0, atol=0)


def test_under_autocast_it_computes_in_bf16_like_sdpa() -> None:
    q, k, v, mask = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = plain_decode_attention(_Attn(), q, k, v.to(torch.bfloat16), mask)
        ref, _ = sdpa_attention_forward(_Attn(), q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), mask)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=2e-2)


def test_longer_queries_go_to_sdpa_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6 if i == 0 else 2, 5, 16, generator=g) for i in range(3))
    torch.testing.assert_close(plain_decode_attention(_Attn(), q, k, v, None)[0],
                               sdpa_attention_forward(_Attn(), q, k, v, None)[0], rtol=0, atol=0)


def _engine_outputs(model, tok, on: bool, calls: list[int]):
    reqs = [GenRequest(render_prompt(tok, Sample(id=str(i), prompt=p), chat=True), n=3)
            for i, p in enumerate(["What is 2+3?", "Start at 3. Add 4. Times 2."])]  # unequal: left padding
    out = HFEngine(model, tok, RolloutConfig(max_new_tokens=20, temperature=1.0, static_cache=False),
                   decode_attention=on).generate(reqs, seed=5)
    return [g for gs in out for g in gs]


def test_the_plain_loop_samples_the_same_tokens_with_it(monkeypatch) -> None:
    model, tok = load_policy(ModelConfig(path="tiny", tiny=TinyModel(hidden_size=64, num_layers=2, num_heads=4,
                                                                      num_kv_heads=2)))
    calls: list[int] = []

    def counted(module, query, *a, **kw):
        calls.append(query.shape[2])
        return plain_decode_attention(module, query, *a, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, hf.DECODE_ATTN_NAME, counted)
    plain = _engine_outputs(model, tok, False, calls)
    assert calls == []  # off: every step through sdpa
    fast = _engine_outputs(model, tok, True, calls)
    assert calls and set(calls) == {1}  # on: the decode steps only (the prefill keeps sdpa)
    assert len(calls) == 2 * 19  # 2 layers x the 19 steps after the prefill's token
    assert [g.ids for g in plain] == [g.ids for g in fast]
    assert len({tuple(g.ids) for g in plain}) == len(plain)  # sampled: every row its own tokens
    diff = max(abs(x - y) for a, b in zip(plain, fast, strict=True) for x, y in zip(a.logprobs, b.logprobs, strict=True))
    assert diff < 1e-5
    assert model.config._attn_implementation == "sdpa"  # the model's own setting is back


def test_it_is_on_by_default_on_cpu_and_only_for_plain_causal_sdpa_models() -> None:
    model, tok = load_policy(ModelConfig(path="tiny"))
    assert HFEngine(model, tok, RolloutConfig())._decode_attention_name() == hf.DECODE_ATTN_NAME
    eager, _ = load_policy(ModelConfig(path="tiny", attn_implementation="eager"))
    assert HFEngine(eager, tok, RolloutConfig())._decode_attention_name() is None
