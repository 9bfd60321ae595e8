"""Fast decode for the transformers backend: a preallocated (static) KV cache and one compiled step.

The plain loop in `hf.py` calls the model once per token through Python (about 20 ms a token for a
0.5B model on an H100, whatever the batch). Here every decode step is the same function over tensors
of fixed shape and address, so `torch.compile(mode="reduce-overhead")` records it once as a CUDA
graph and each token costs one graph replay plus a few tiny launches. What makes that possible:

- transformers' `StaticCache`, allocated once per (batch, cache length) and reused across calls
  (a new address would re-record the graph);
- the shared prompt of each group prefilled once (with the ordinary dynamic cache) and its keys and
  values copied G times into the static cache;
- an additive 4D attention mask kept in a static buffer (one column opened per step), which
  transformers passes through untouched;
- decode attention that reads the grouped KV heads in place (`grouped_decode_attention`), instead
  of sdpa with a mask, which first copies every KV head G_q times (`repeat_kv`);
- sampling by inverse CDF (the first token whose cumulative probability reaches u * total,
  u ~ U(0, 1]), with one uniform per row drawn from a seeded generator on the device before each
  step; inside the compiled step on CPU, eagerly after the graph's replay on CUDA. (An exponential
  race, argmax p / E as in vLLM, needs (B, V) noise a step: drawing it was a third of the CPU
  decode time.)

Departures from the plain loop: the same seed gives different samples (another sampler and RNG);
with top_k = 1 both are greedy and agree token for token. No stop strings (the engine falls back to
the plain loop when `rollout.stop` is set). Finished rows keep decoding pad tokens until every row
is done (fixed shapes); the loop checks for that every `check_every` steps.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

ATTN_NAME = "guidedrl_grouped_decode"


def grouped_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention over grouped KV heads without repeating them (transformers' attention interface).

    query (B, Hq, Q, D), key / value (B, Hkv, L, D), attention_mask additive (B, 1, Q, L) ->
    (B, Q, Hq, D). Query head h reads KV head h // (Hq / Hkv), as transformers' `repeat_kv` does.
    """
    B, Hq, Q, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    g = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, Hkv, g * Q, D)  # (B, Hkv, g*Q, D): heads of one KV group are adjacent
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, Hkv, g*Q, L)
    if attention_mask is not None:
        m = attention_mask[:, :, :, :L].float()  # (B, 1, Q, L)
        scores = (scores.view(B, Hkv, g, Q, L) + m[:, :, None]).view(B, Hkv, g * Q, L)
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, g*Q, D)
    return out.view(B, Hq, Q, D).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, grouped_decode_attention)


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention function (training keeps its own)."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def inverse_cdf_sample(probs: Tensor, u: Tensor) -> Tensor:
    """A sample from each row of probs (B, V) (unnormalized is fine) given u (B, 1) ~ U(0, 1] -> (B,).

    Token k is picked when cum[k-1] < u * cum[-1] <= cum[k], which has probability p_k / sum(p); a
    zero-probability token (cum[k] == cum[k-1]) is never picked, and u > 0 keeps the count <= V - 1.
    """
    cum = probs.cumsum(-1)  # (B, V)
    return (cum < u * cum[:, -1:]).sum(-1)  # (B,) number of tokens whose cumulative mass is below the draw


class StaticDecoder:
    """Samples with a static KV cache and a (optionally compiled) single-token decode step."""

    def __init__(self, model: nn.Module, config: Any, cache_kw: str, *, compile_step: bool, check_every: int = 16) -> None:
        self.model = model
        self.config = config
        self.cache_kw = cache_kw
        self.compile_step = compile_step
        self.check_every = check_every
        self._key: tuple[Any, ...] | None = None
        self._bufs: dict[str, Any] = {}
        self._step: Callable[..., tuple[Tensor, Tensor]] | None = None
        _register_attention()

    def _setup(self, B: int, L: int, V: int, dev: torch.device, dtype: torch.dtype, sampling: tuple[Any, ...]) -> None:
        """(Re)allocate the cache and buffers, and build the step, only when a shape or setting changes."""
        key = (B, L, V, dev, dtype, sampling)
        if key == self._key:
            return
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=L)
        Hkv = self.config.num_key_value_heads
        D = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        dummy = torch.zeros((B, Hkv, 1, D), dtype=dtype, device=dev)
        for layer in cache.layers:
            layer.lazy_initialization(dummy, dummy)  # allocates (B, Hkv, L, D) and marks static addresses
        b = {
            "cache": cache,
            "ids": torch.zeros((B, 1), dtype=torch.long, device=dev),
            "pos": torch.zeros((B, 1), dtype=torch.long, device=dev),
            "mask": torch.zeros((B, 1, 1, L), dtype=dtype, device=dev),
            "bias": torch.zeros(V, dtype=torch.float32, device=dev),
            "u": torch.ones((B, 1), dtype=torch.float32, device=dev),
            "done": torch.zeros(B, dtype=torch.bool, device=dev),
        }
        for name in ("ids", "pos", "mask", "bias", "u", "done"):
            torch._dynamo.mark_static_address(b[name])
        self._bufs = b
        self._step = self._make_step(sampling, compile_now=self.compile_step, dev=dev)
        self._key = key

    def _make_step(
        self, sampling: tuple[Any, ...], *, compile_now: bool, dev: torch.device
    ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The decode step: model forward over the static buffers, then sampling.

        Compiled on CPU as one function (inductor fuses the sampler's (B, V) passes). On CUDA only the
        forward is compiled (a CUDA graph) and the sampler runs eagerly, a handful of kernels a token:
        inductor (torch 2.11) failed to generate the split scan of the sampler's cumsum over a
        151936-token vocabulary on an H100, and a failed compile means an uncompiled decode.
        """
        from guidedrl.rollout.hf import _filter_logits

        temperature, top_k, top_p, pad_id = sampling
        b, model, kw = self._bufs, self.model, self.cache_kw

        def forward() -> Tensor:
            res = model(input_ids=b["ids"], position_ids=b["pos"], attention_mask=b["mask"], use_cache=True,
                        logits_to_keep=1, **{kw: b["cache"]})
            return res.logits[:, -1, :]  # (B, V)

        def sample(logits: Tensor, eos: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
            return sample_tokens(logits, b["bias"], b["u"], b["done"], eos, pad, temperature, top_k, top_p,
                                 _filter_logits)

        if compile_now and dev.type == "cuda":
            fwd = torch.compile(forward, mode="reduce-overhead", dynamic=False)
            return lambda eos, pad: sample(fwd(), eos, pad)  # the graph's output is read before the next replay

        def step(eos: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
            return sample(forward(), eos, pad)

        return torch.compile(step, dynamic=False) if compile_now else step


    @torch.no_grad()
    def decode(
        self,
        prefill_cache: Any,
        first_logits: Tensor,
        attn: Tensor,
        inverse: Tensor,
        *,
        max_new: int,
        min_new: int,
        temperature: float,
        top_k: int,
        top_p: float,
        pad_id: int,
        eos: Tensor,
        gen: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """Continue U prefilled contexts as B = len(inverse) rows (row b continues context inverse[b]).

        prefill_cache: the dynamic cache of the prefill over the U left-padded contexts (U, P);
        first_logits (U, V): their last-position logits; attn (U, P) their attention mask.
        -> out_ids (B, max_new) with pad after a row's eos, out_logprobs (B, max_new) (0 there).
        """
        U, P = attn.shape
        B, V, dev = len(inverse), first_logits.shape[-1], first_logits.device
        dtype = prefill_cache.layers[0].keys.dtype
        L = _bucket(P + max_new)
        self._setup(B, L, V, dev, dtype, (temperature, top_k, top_p, pad_id))
        b = self._bufs
        self._load_prefill(prefill_cache, attn, inverse, P)
        pad = torch.tensor(pad_id, device=dev)
        eos = eos.to(dev)
        out_ids = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, max_new), dtype=torch.float32, device=dev)
        from guidedrl.rollout.hf import _filter_logits

        self._min_tokens_bias(eos, 0, min_new)
        _draw(b["u"], gen)
        nxt, lp = sample_tokens(first_logits[inverse], b["bias"], b["u"], b["done"], eos, pad,
                                temperature, top_k, top_p, _filter_logits)
        out_ids[:, 0], out_lp[:, 0] = nxt, lp
        with attention_implementation(self.config, ATTN_NAME):
            for t in range(1, max_new):
                if t % self.check_every == 0 and eos.numel() and t > min_new and bool(b["done"].all()):
                    break
                b["ids"].copy_(out_ids[:, t - 1 : t])
                b["mask"][:, :, :, P + t - 1] = 0.0  # the token fed at this step becomes visible
                self._min_tokens_bias(eos, t, min_new)
                _draw(b["u"], gen)
                nxt, lp = self._run_step(eos, pad)
                out_ids[:, t], out_lp[:, t] = nxt, lp  # copied out before the next replay overwrites them
                b["pos"].add_(1)
        return out_ids, out_lp

    def _run_step(self, eos: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
        """One decode step; a compile that fails (it does so on the first call) falls back to eager.

        Re-running the step is safe: it rewrites the same cache slot and `done` from the same draw.
        """
        assert self._step is not None and self._key is not None
        try:
            return self._step(eos, pad)
        except Exception as e:  # noqa: BLE001 - any compiler failure; the eager step re-raises real errors
            if not self.compile_step:
                raise
            warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {e}); decoding uncompiled",
                          stacklevel=2)
            self.compile_step = False
            self._step = self._make_step(self._key[-1], compile_now=False, dev=self._key[3])
            return self._step(eos, pad)

    def _min_tokens_bias(self, eos: Tensor, t: int, min_new: int) -> None:
        """eos gets -inf logits while fewer than min_new tokens exist (changed only at t = 0 and min_new)."""
        if eos.numel() and t in (0, min_new):
            self._bufs["bias"][eos] = float("-inf") if t < min_new else 0.0

    def _load_prefill(self, prefill_cache: Any, attn: Tensor, inverse: Tensor, P: int) -> None:
        """Copy the U prefilled contexts' keys/values into the B static rows; set mask, positions, lengths."""
        b = self._bufs
        inv = inverse.to(attn.device)
        for src, dst in zip(prefill_cache.layers, b["cache"].layers, strict=True):
            dst.keys[:, :, :P].copy_(src.keys[inv])  # (B, Hkv, P, D): prompt K/V shared by the group
            dst.values[:, :, :P].copy_(src.values[inv])
            dst.cumulative_length.fill_(P)
        neg = torch.finfo(b["mask"].dtype).min
        b["mask"].fill_(neg)
        b["mask"][:, 0, 0, :P] = torch.where(attn[inv].bool(), 0.0, neg).to(b["mask"].dtype)
        b["pos"].copy_(attn[inv].sum(-1, keepdim=True))  # (B, 1) position of the first new token
        b["done"].zero_()


def sample_tokens(
    logits: Tensor,
    bias: Tensor,
    u: Tensor,
    done: Tensor,
    eos: Tensor,
    pad: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    filter_fn: Callable[[Tensor, int, float], Tensor],
) -> tuple[Tensor, Tensor]:
    """One sampling step on the device. logits (B, V) -> (next ids (B,), behaviour log-probs (B,)).

    Updates `done` (B,) in place: rows that sampled eos are done; done rows emit pad with log-prob 0.
    """
    scaled = logits.float() / temperature + bias  # (B, V)
    logp = scaled.log_softmax(-1)  # (B, V) the recorded behaviour distribution (no top-k/p renormalization)
    probs = filter_fn(scaled, top_k, top_p).softmax(-1)
    nxt = inverse_cdf_sample(probs, u)  # (B,)
    nxt = torch.where(done, pad, nxt)
    lp = logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(done, 0.0)  # (B,)
    done |= torch.isin(nxt, eos)
    return nxt, lp


def _draw(u: Tensor, gen: torch.Generator) -> None:
    """u (B, 1) <- U(0, 1], in place (1 - U[0, 1): a draw of exactly 0 could pick a zero-mass token 0)."""
    u.uniform_(generator=gen).neg_().add_(1.0)


def _bucket(n: int, size: int = 128) -> int:
    """Cache length rounded up, so that prompts of nearby lengths reuse one compiled graph."""
    return -(-n // size) * size
