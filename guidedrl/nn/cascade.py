"""Cascade attention for the training forward over groups that share a prompt (CPU).

In a GRPO micro-batch the G rows of a group continue one prompt. `logprobs.response_hidden` runs
each distinct prompt through the trunk once; this module lets the responses attend to those
prompt keys without copying them G times and without an explicit mask:

    softmax over [prompt; own] = merge of  A_p = attention(q, prompt keys)          (no mask)
                                      and  A_o = attention(q, own keys, causal)     (no mask)

with the two partial results weighted by their log-sum-exps, lse = logaddexp(lse_p, lse_o),
out = exp(lse_p - lse) * A_p + exp(lse_o - lse) * A_o. The backward of attention over a union of
key sets is the sum of each part's flash backward run with the *merged* output and lse (the
softmax's row statistics are shared), so both parts keep PyTorch's fused CPU flash kernels
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward) and nothing of size
(B, H, R, P + R) is materialized. The prompt part runs the G rows' queries of a group as one
long query block against the group's P keys. Grouped KV heads are read in place (the kernel
takes them as they are).

Why: with a KV cache the response forward needs an explicit (R, P + R) mask, which the CPU flash
kernel applies over every key block; split, the own part is plainly causal and the prompt part
has no mask (or a key-padding one when prompts are left-padded). On the CPU benchmark's shapes
(hidden 64, head dimension 16, 64 rows, 64-token prompts; `bench/bench_update.py --threads 2`,
2026-11-25) the update's forward + backward went from 0.115 to 0.113 s at 128 response tokens,
0.278 to 0.274 s at 256 and 0.816 to 0.687 s at 512, where the masked path was slower than no
prompt sharing at all (0.735 s).

Conditions (else `response_hidden` keeps its expanded-cache path): CPU tensors; rows in equal
adjacent groups; each row's response tokens a prefix of its response columns (right padding only);
a model whose attention is plain causal softmax attention (`supports`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from guidedrl.nn.models import attention_dtype

ATTN_NAME = "guidedrl_cascade_train"

# Model types whose layers call the attention interface with plain causal attention (no sliding
# window when `use_sliding_window` is off, no logit softcap, no attention sinks).
_PLAIN_CAUSAL = frozenset({"llama", "qwen2", "qwen3"})


def supports(config: Any) -> bool:
    """Whether a model with this config can use the cascade training attention."""
    return (getattr(config, "model_type", None) in _PLAIN_CAUSAL and not getattr(config, "use_sliding_window", False)
            and getattr(config, "attention_dropout", 0.0) == 0.0)


def _to_groups(x: Tensor, U: int) -> Tensor:
    """(B, H, R, ...) -> (U, H, G*R, ...): a group's rows one after another along the query axis."""
    B, H, R = x.shape[:3]
    G = B // U
    return x.reshape(U, G, H, R, *x.shape[3:]).transpose(1, 2).reshape(U, H, G * R, *x.shape[3:])


def _from_groups(x: Tensor, U: int, R: int) -> Tensor:
    """(U, H, G*R, ...) -> (B, H, R, ...), the inverse of `_to_groups`."""
    H, GR = x.shape[1:3]
    G = GR // R
    return x.reshape(U, H, G, R, *x.shape[3:]).transpose(1, 2).reshape(U * G, H, R, *x.shape[3:])


class CascadeAttention(torch.autograd.Function):
    """out (B, Hq, R, D) of queries q (B, Hq, R, D) over [prompt keys of the row's group; own keys,
    causal]. k, v (B, Hkv, R, D) own; pk, pv (U, Hkv, P, D) with row b in group b // (B / U);
    pmask (U, 1, 1, P) additive key mask of the prompt (left padding) or None; scale float."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, pmask: Tensor | None,
                scale: float) -> Tensor:
        fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        U, R = pk.shape[0], q.shape[2]
        o_p, l_p = fa(_to_groups(q, U), pk, pv, 0.0, False, attn_mask=pmask, scale=scale)  # (U, Hq, G*R, D), (U, Hq, G*R)
        o_p, l_p = _from_groups(o_p, U, R), _from_groups(l_p, U, R)  # (B, Hq, R, D), (B, Hq, R)
        o_o, l_o = fa(q, k, v, 0.0, True, scale=scale)  # own keys: causal, no mask
        lse = torch.logaddexp(l_p, l_o)  # (B, Hq, R) float32: the whole softmax's normalizer
        out = (o_p.float() * (l_p - lse).exp()[..., None] + o_o.float() * (l_o - lse).exp()[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.pmask, ctx.scale = pmask, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        fb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        U = pk.shape[0]
        g = grad_out.contiguous()
        # each part's backward with the merged output and lse: P = exp(s - lse) restricted to its keys
        dq_p, dpk, dpv = fb(_to_groups(g, U).contiguous(), _to_groups(q, U).contiguous(), pk, pv,
                            _to_groups(out, U).contiguous(), _to_groups(lse, U).contiguous(), 0.0, False,
                            attn_mask=ctx.pmask, scale=ctx.scale)
        dq_o, dk, dv = fb(g, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        return dq_o + _from_groups(dq_p, U, q.shape[2]), dk, dv, dpk, dpv, None, None


def cascade_train_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    guidedrl_prefix: tuple[list[Tensor], list[Tensor], Tensor | None] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention interface: query (B, Hq, R, D), key / value (B, Hkv, R, D) of the
    response tokens; guidedrl_prefix = (prompt keys per layer, prompt values per layer, additive
    prompt mask (U, 1, 1, P) or None), each layer's (U, Hkv, P, D). -> (B, R, Hq, D)."""
    if guidedrl_prefix is None:
        raise RuntimeError("cascade training attention called without the prompt's keys (guidedrl_prefix)")
    pks, pvs, pmask = guidedrl_prefix
    D = query.shape[-1]
    scale = D**-0.5 if scaling is None else scaling
    dt = attention_dtype(value)  # under autocast RoPE leaves q and k in float32, v in bf16: one dtype, as sdpa
    q, k, v, pk, pv = (x.to(dt).contiguous() for x in (query, key, value, pks[module.layer_idx], pvs[module.layer_idx]))
    out = CascadeAttention.apply(q, k, v, pk, pv, None if pmask is None else pmask.to(dt), scale)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register() -> None:
    """Make the function known to transformers (once a process: every later call is a cache hit,
    since the update's forward calls it each micro-batch)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, cascade_train_attention)
