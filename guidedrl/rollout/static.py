"""Fast decode for the transformers backend: preallocated (static) KV buffers and one compiled step.

The plain loop in `hf.py` calls the model once per token through Python (about 20 ms a token for a
0.5B model on an H100, whatever the batch). Here every decode step is the same function over tensors
of fixed shape and address, so `torch.compile(mode="reduce-overhead")` records it once as a CUDA
graph and each token costs one graph replay plus a few tiny launches. What makes that possible:

- static buffers, allocated once per (batch, cache length) and reused across calls (a new address
  would re-record the graph): the shared prompt of each group is prefilled once (with the ordinary
  dynamic cache) and its keys and values are kept once per group in a prompt store; the response
  store holds each row's own response tokens, written by the attention function itself (the model
  runs without a transformers cache);
- cascade decode attention (`cascade_decode_attention`): each step's queries read their group's
  prompt keys once for the whole group and their own response keys, with one softmax over both.
  Decode attention is memory-bound: a cache of G copies of the prompt would be read G times a
  step. Grouped KV heads are read in place instead of copied G_q times (`repeat_kv`). In the
  compiled CPU step the products of the probabilities with the values are written as a broadcast
  multiply-and-sum, which inductor fuses with the softmax into vectorized loops (a batched GEMM
  with 2 query rows per (row, head) is mostly call overhead; 3-7% of the decode, measured
  interleaved with the BMM version at 128 and 512 tokens). The scores stay matmuls: written the
  same way, they made the decode slower;
- the bookkeeping inside the step: the response mask is built from a step counter kept on the
  device, and the sampled ids, behaviour log-probs, next input and position are written into
  static buffers there; transformers passes a 4D additive mask through untouched;
- on CPU, 4 tokens per compiled call (each call pays dynamo's guards and the launch code, more
  than the small model's kernels), reading only the response slots written so far;
- sampling by inverse CDF (the first token whose cumulative probability reaches u * total,
  u ~ U(0, 1]), with the uniforms of every row and step drawn up front by the engine (the plain
  loop samples from the same draws); inside the compiled step on CPU, eagerly after the graph's
  replay on CUDA. (An exponential race, argmax p / E as in vLLM, needs (B, V) noise a step: drawing
  it was a third of the CPU decode time.)

Departures from the plain loop: none in the tokens (the same sampler and draws, so the same seed
gives the same samples up to floating-point near-ties). No stop strings (the engine falls back to
the plain loop when `rollout.stop` is set). Finished rows keep decoding pad tokens until every row
is done (fixed shapes); the loop checks for that every `check_every` steps.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from guidedrl.nn.models import attention_dtype, attention_implementation
from guidedrl.rollout.sampling import filter_logits, sample_tokens

ATTN_NAME = "guidedrl_cascade_decode"

DecodeStore = tuple[list[Tensor], list[Tensor], Tensor, list[Tensor], list[Tensor], Tensor]
"""(prompt keys per layer (U, Hkv, P, D), prompt values per layer (U, Hkv, P, D), additive prompt mask
(U, 1, 1, P), response keys per layer (B, Hkv, L, D), response values per layer (B, Hkv, L, D), t):
the decode step's buffers; t is the number of response tokens fed so far, this one included."""


def _weighted_values(probs: Tensor, v: Tensor, fused: bool) -> Tensor:
    """probs (..., M, L) @ v (..., L, D). fused: as a broadcast multiply-and-sum, which inductor fuses
    with the softmax before it (compiling on CPU, where M is 2-16 and a BMM call is mostly overhead)."""
    if fused:
        return (probs[..., :, :, None] * v[..., None, :, :]).sum(-2)
    return torch.matmul(probs, v)


def cascade_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    guidedrl_decode: DecodeStore | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """One decode token's attention over its group's prompt plus its row's own response tokens.

    query (B, Hq, 1, D), key / value (B, Hkv, 1, D): this token's; they are written into the response
    store at slot t - 1 first. attention_mask additive (B, 1, 1, n) over the first n response slots
    (the ones read). guidedrl_decode: `DecodeStore`, with B = U * G and rows u*G..u*G+G-1 continuing
    prompt u. Equal to attention over each row's [prompt; own] keys (tested). -> (B, 1, Hq, D).
    """
    if guidedrl_decode is None or attention_mask is None or query.shape[2] != 1:
        raise RuntimeError("cascade decode attention needs the decode store, a mask and one query token")
    pks, pvs, pmask, ks, vs, t = guidedrl_decode
    i = module.layer_idx
    slot = (t - 1).view(1)
    ks[i].index_copy_(2, slot, key.to(ks[i].dtype))  # (B, Hkv, 1, D) into (B, Hkv, L, D); float32 keys under autocast
    vs[i].index_copy_(2, slot, value.to(vs[i].dtype))
    n = attention_mask.shape[-1]
    k, v = ks[i][:, :, :n], vs[i][:, :, :n]  # the slots this call reads
    pk, pv = pks[i], pvs[i]  # (U, Hkv, P, D)
    B, Hq, Q, D = query.shape
    U, Hkv, P, _ = pk.shape
    G, g = B // U, Hq // Hkv
    fused = query.device.type == "cpu" and torch.compiler.is_compiling()
    scale = D**-0.5 if scaling is None else scaling
    dt = attention_dtype(value)  # the stores' dtype: the model's, or autocast's as sdpa would compute in
    q = query.to(dt).reshape(B, Hkv, g, D)  # the heads of one KV group adjacent
    qg = q.view(U, G, Hkv, g, D).transpose(1, 2).reshape(U, Hkv, G * g, D)  # a group's queries together
    s_p = torch.matmul(qg, pk.transpose(-1, -2)).float() * scale + pmask.float()  # (U, Hkv, G*g, P), padding masked
    s_r = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, Hkv, g, n)
    s_r = s_r + attention_mask.float()  # (B, 1, 1, n): unwritten slots masked
    s_p = s_p.view(U, Hkv, G, g, P).transpose(1, 2).reshape(B, Hkv, g, P)
    probs = torch.cat([s_p, s_r], -1).softmax(-1).to(dt)  # (B, Hkv, g, P+n): one softmax
    p_p = probs[..., :P].reshape(U, G, Hkv, g, P).transpose(1, 2).reshape(U, Hkv, G * g, P)
    out_p = _weighted_values(p_p, pv, fused).view(U, Hkv, G, g, D).transpose(1, 2).reshape(B, Hkv, g, D)
    out = out_p + _weighted_values(probs[..., P:], v, fused)  # (B, Hkv, g, D)
    return out.view(B, Hq, Q, D).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, cascade_decode_attention)


class StaticDecoder:
    """Samples with static KV buffers and a (optionally compiled) decode step of `unroll` tokens."""

    def __init__(self, model: nn.Module, config: Any, *, compile_step: bool, check_every: int = 16,
                 unroll: int | None = None) -> None:
        """unroll: tokens per step call (None: 4 for the compiled CPU step, else 1). On CPU each call of a
        compiled step pays its guards and launch code (about 0.4 ms for a small model, more than its
        kernels), so 4 tokens per call pay it once; on CUDA a graph replay is already cheap."""
        self.model = model
        self.config = config
        self.compile_step = compile_step
        self.check_every = check_every
        self.unroll = unroll
        self.graph_forward: bool | None = None
        """Compile only the forward, as a replayed graph, and sample eagerly (None: on CUDA)."""
        self._key: tuple[Any, ...] | None = None
        self._bufs: dict[str, Any] = {}
        self._step: Callable[..., None] | None = None
        self._advance: Callable[[Tensor, Tensor, Tensor], None] | None = None
        _register_attention()

    def _graph_forward(self, dev: torch.device) -> bool:
        return self.compile_step and (self.graph_forward if self.graph_forward is not None else dev.type == "cuda")

    def _tokens_per_call(self, dev: torch.device) -> int:
        if self._graph_forward(dev):
            return 1  # one replay per token
        if self.unroll is not None:
            return self.unroll
        return 4 if self.compile_step else 1

    def _setup(self, shape: tuple[int, int, int, int, int], dev: torch.device, dtype: torch.dtype,
               sampling: tuple[Any, ...]) -> None:
        """(Re)allocate the stores and buffers, and build the step, only when a shape or setting changes.

        shape = (B rows, U prompts, P prompt store length, L response store length, V vocabulary).
        """
        key = (shape, dev, dtype, sampling)
        if key == self._key:
            return
        B, U, P, L, V = shape
        Hkv = self.config.num_key_value_heads
        D = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        n_layers = self.config.num_hidden_layers
        b = {
            "pk": [torch.zeros((U, Hkv, P, D), dtype=dtype, device=dev) for _ in range(n_layers)],
            "pv": [torch.zeros((U, Hkv, P, D), dtype=dtype, device=dev) for _ in range(n_layers)],
            "k": [torch.zeros((B, Hkv, L, D), dtype=dtype, device=dev) for _ in range(n_layers)],
            "v": [torch.zeros((B, Hkv, L, D), dtype=dtype, device=dev) for _ in range(n_layers)],
            "pmask": torch.zeros((U, 1, 1, P), dtype=dtype, device=dev),
            "ids": torch.zeros((B, 1), dtype=torch.long, device=dev),  # the token fed next
            "pos": torch.zeros((B, 1), dtype=torch.long, device=dev),  # its position id
            "t": torch.zeros((), dtype=torch.long, device=dev),  # its index in the response (= its store slot + 1)
            "min_new": torch.zeros((), dtype=torch.long, device=dev),
            "eos_bias": torch.zeros(V, dtype=torch.float32, device=dev),  # -inf at eos, added while t < min_new
            "draws": torch.ones((L, B, 1), dtype=torch.float32, device=dev),  # U(0, 1] per step and row
            "done": torch.zeros(B, dtype=torch.bool, device=dev),
            "slots": torch.arange(L, device=dev),
            "out_ids": torch.zeros((B, L), dtype=torch.long, device=dev),
            "out_lp": torch.zeros((B, L), dtype=torch.float32, device=dev),
        }
        for t in [*b["pk"], *b["pv"], *b["k"], *b["v"], *(v for k, v in b.items() if isinstance(v, Tensor))]:
            torch._dynamo.mark_static_address(t)
        self._bufs = b
        self._advance = self._make_advance(sampling)
        self._step = self._make_step(compile_now=self.compile_step, dev=dev)
        self._key = key

    def _make_advance(self, sampling: tuple[Any, ...]) -> Callable[[Tensor, Tensor, Tensor], None]:
        """advance(logits (B, V), eos, pad): sample token t from the logits, record it and its
        behaviour log-prob at column t, make it the next input, and move t and the position on."""
        temperature, top_k, top_p, _ = sampling
        b = self._bufs

        def advance(logits: Tensor, eos: Tensor, pad: Tensor) -> None:
            t = b["t"]
            bias = torch.where(t < b["min_new"], b["eos_bias"], 0.0)  # (V,)
            u = b["draws"].index_select(0, t.view(1))[0]  # (B, 1); a tensor index, not a Python int (no graph break)
            nxt, lp = sample_tokens(logits, bias, u, b["done"], eos, pad, temperature, top_k, top_p, filter_logits)
            b["out_ids"].index_copy_(1, t.view(1), nxt[:, None])
            b["out_lp"].index_copy_(1, t.view(1), lp[:, None])
            b["ids"].copy_(nxt[:, None])
            b["pos"].add_(1)
            t.add_(1)

        return advance

    def _make_step(self, *, compile_now: bool, dev: torch.device) -> Callable[..., None]:
        """The decode step: `unroll` times (model forward over the static buffers, sample, record, advance).

        Compiled on CPU as one function (inductor fuses the sampler's (B, V) passes). On CUDA only the
        forward is compiled (a CUDA graph) and the sampler runs eagerly, a handful of kernels a token:
        inductor (torch 2.11) failed to generate the split scan of the sampler's cumsum over a
        151936-token vocabulary on an H100, and a failed compile means an uncompiled decode.
        """
        b, model, advance = self._bufs, self.model, self._advance
        assert advance is not None
        k = self._tokens_per_call(dev)
        B = b["out_ids"].shape[0]

        def forward(slots: Tensor) -> Tensor:
            """slots (n,): the response slots this call may read (the first n of L; all of them on CUDA)."""
            n = slots.shape[0]
            neg = torch.finfo(b["pmask"].dtype).min  # response slots 0..t-1 are visible (slot t-1: this token)
            mask = torch.where(slots < b["t"], 0.0, neg).to(b["pmask"].dtype).view(1, 1, 1, n).expand(B, 1, 1, n)
            store = (b["pk"], b["pv"], b["pmask"], b["k"], b["v"], b["t"])
            res = model(input_ids=b["ids"], position_ids=b["pos"], attention_mask=mask, use_cache=False,
                        logits_to_keep=1, guidedrl_decode=store)
            return res.logits[:, -1, :]  # (B, V)

        if compile_now and self._graph_forward(dev):  # one graph over the whole store: shapes never change
            fwd = torch.compile(forward, mode="reduce-overhead", dynamic=False)
            every = b["slots"]
            return lambda eos, pad, slots: advance(fwd(every), eos, pad)  # the output is read before the next replay

        def step(eos: Tensor, pad: Tensor, slots: Tensor) -> None:
            for _ in range(k):
                advance(forward(slots), eos, pad)

        # On CPU the step reads only the response slots written so far (`slots` grows by 16; the
        # compile is dynamic in its length): decode attention is memory-bound and the whole store is
        # L slots. cpp_wrapper: the code that launches the kernels is C++ too, not Python (about
        # 0.1 ms less per call, where nothing replays a graph).
        return torch.compile(step, options={"cpp_wrapper": True}) if compile_now else step

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
        draws: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Continue U prefilled contexts as B = len(inverse) rows (row b continues context inverse[b]).

        prefill_cache: the dynamic cache of the prefill over the U left-padded contexts (U, P);
        first_logits (U, V): their last-position logits; attn (U, P) their attention mask; draws
        (max_new, B) the sampler's uniforms in (0, 1], one per step and row.
        -> out_ids (B, max_new) with pad after a row's eos, out_logprobs (B, max_new) (0 there).
        """
        U, P = attn.shape
        B, V, dev = len(inverse), first_logits.shape[-1], first_logits.device
        dtype = prefill_cache.layers[0].values.dtype  # the model's, or autocast's (keys leave RoPE in float32)
        grouped = _grouped(inverse, U)  # rows u*G..u*G+G-1 continue prompt u: the prompt store holds U rows
        k = self._tokens_per_call(dev)
        # a call may run k - 1 tokens past max_new (dropped): the response store has room for them
        shape = (B, U if grouped else B, _bucket(P, 64), _bucket(max_new + k - 1, 32), V)
        self._setup(shape, dev, dtype, (temperature, top_k, top_p, pad_id))
        b = self._bufs
        self._load_prefill(prefill_cache, attn, inverse, grouped)
        pad = torch.tensor(pad_id, device=dev)
        eos = eos.to(dev)
        b["draws"].fill_(1.0)  # the k - 1 slots past max_new: tokens that are dropped
        b["draws"][:max_new, :, 0].copy_(draws)  # (max_new, B)
        b["eos_bias"].zero_()
        if eos.numel():
            b["eos_bias"][eos] = float("-inf")
        b["min_new"].fill_(min_new)
        b["out_ids"].fill_(pad_id)
        b["out_lp"].zero_()
        b["t"].zero_()
        assert self._advance is not None
        self._advance(first_logits[inverse], eos, pad)  # token 0, from the prefill's last logits
        with attention_implementation(self.config, ATTN_NAME):
            t, checked = 1, 1
            while t < max_new:
                if t - checked >= self.check_every and eos.numel() and t > min_new:
                    checked = t
                    if bool(b["done"].all()):
                        break
                slots = b["slots"][: _bucket(t + k - 1, 16)]  # slots t-1 .. t+k-2 are written in this call
                torch._dynamo.maybe_mark_dynamic(slots, 0)  # compiled once for every length, not once per length
                self._run_step(eos, pad, slots)
                t += k
        return b["out_ids"][:, :max_new].clone(), b["out_lp"][:, :max_new].clone()

    def _run_step(self, eos: Tensor, pad: Tensor, slots: Tensor) -> None:
        """One step call; a compile that fails (it does so on the first call, before anything runs)
        falls back to eager."""
        assert self._step is not None and self._key is not None
        try:
            self._step(eos, pad, slots)
        except Exception as e:  # noqa: BLE001 - any compiler failure; the eager step re-raises real errors
            if not self.compile_step:
                raise
            warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {e}); decoding uncompiled",
                          stacklevel=2)
            self.compile_step = False
            self._step = self._make_step(compile_now=False, dev=self._key[1])
            self._step(eos, pad, slots)

    def _load_prefill(self, prefill_cache: Any, attn: Tensor, inverse: Tensor, grouped: bool) -> None:
        """Put the U prefilled contexts' keys/values in the prompt store (once per group when `grouped`,
        else once per row), right-aligned; empty the response store; set masks, positions, lengths."""
        b = self._bufs
        P = attn.shape[1]
        inv = inverse.to(attn.device)
        rows = slice(None) if grouped else inv
        for src, pk, pv, k, v in zip(prefill_cache.layers, b["pk"], b["pv"], b["k"], b["v"], strict=True):
            pk[:, :, -P:].copy_(src.keys[rows])  # (U or B, Hkv, P, D), left-padded like the prefill
            pv[:, :, -P:].copy_(src.values[rows])
            k.zero_()  # unwritten slots get probability 0; zeros keep a stale non-finite value from leaking in
            v.zero_()
        neg = torch.finfo(b["pmask"].dtype).min
        b["pmask"].fill_(neg)
        b["pmask"][:, 0, 0, -P:] = torch.where(attn[rows].bool(), 0.0, neg).to(b["pmask"].dtype)
        b["pos"].copy_(attn[inv].sum(-1, keepdim=True) - 1)  # (B, 1) the prompt's last position; token 0 moves it on
        b["done"].zero_()


def _grouped(inverse: Tensor, U: int) -> bool:
    """Whether B rows continue U contexts in equal adjacent groups (row b continues context b // G)."""
    B = len(inverse)
    if B % U:
        return False
    expected = torch.arange(U, device=inverse.device).repeat_interleave(B // U)
    return bool(torch.equal(inverse, expected))


def _bucket(n: int, size: int = 128) -> int:
    """Cache length rounded up, so that prompts of nearby lengths reuse one compiled graph."""
    return -(-n // size) * size
