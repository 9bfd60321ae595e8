"""The transformers rollout backend: a sampling loop over the model's KV cache.

Why a loop of our own instead of `model.generate`: we need the behaviour log-prob of every sampled
token without keeping (B, T, V) logits, forced response prefixes, stop strings, per-row early exit and
a seeded generator that makes CPU sampling reproducible.

Sampling matches `generate(do_sample=True)` in distribution: logits / temperature, then top-k, then
top-p, then inverse-CDF sampling from one uniform per step and row, drawn up front from the seeded
CPU generator (the same draws for the plain loop and the static decode, so both give the same tokens
under one seed, and dropping finished rows from the batch changes no other row's tokens). The
recorded behaviour log-prob is log_softmax(logits / temperature) of the sampled token, i.e. what a
fresh forward pass at the same temperature gives (top-k/top-p truncation is not renormalized into
it, as in verl and TRL).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from guidedrl.nn import cascade
from guidedrl.core.config import RolloutConfig
from guidedrl.nn.models import attention_dtype, attention_implementation, cache_kwarg, unwrap
from guidedrl.rollout.base import Generation, GenRequest
from guidedrl.rollout.sampling import filter_logits, inverse_cdf_sample
from guidedrl.rollout.static import StaticDecoder
from guidedrl.rollout.weights import CastWeights


DECODE_ATTN_NAME = "guidedrl_plain_decode"


def plain_decode_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The plain loop's attention on CPU: one-token queries as two grouped matmuls; longer queries
    (the prefill) go to transformers' sdpa function unchanged.

    Why: torch's CPU sdpa kernel (flash) splits its work by query blocks, so a one-token query is
    mostly its overhead: for 16 rows, 9 heads over 3 KV heads and 320 keys, 1.38 ms in float32 against
    0.72 ms here, and 3.7 ms against 0.33 ms in bf16 (under autocast); on cpu-135m a sixth of the
    decode. The query heads that share a KV head are one matmul's rows, so keys are not repeated.
    Computes as sdpa does: in the values' dtype (autocast's under autocast), the softmax in float32.
    query (B, Hq, 1, D); key / value (B, Hkv, L, D); attention_mask: sdpa's, bool (B, 1, 1, L) or None.
    -> (B, 1, Hq, D).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    dt = attention_dtype(value)
    q = query.to(dt).view(B, Hkv, Hq // Hkv, D)  # the query heads of one KV head together
    scores = torch.matmul(q, key.to(dt).transpose(-1, -2)).float() * (D**-0.5 if scaling is None else scaling)  # (B, Hkv, g, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))  # (B, 1, 1, L): False = padding
        else:
            scores = scores + attention_mask.float()
    out = torch.matmul(scores.softmax(-1).to(dt), value.to(dt))  # (B, Hkv, g, D)
    return out.view(B, Hq, 1, D).transpose(1, 2).contiguous(), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTN_NAME, plain_decode_attention)
    AttentionMaskInterface.register(DECODE_ATTN_NAME, sdpa_mask)  # the masks sdpa gets (else none at all)


_register_decode_attention()


class HFEngine:
    """Samples continuations with a transformers causal LM (CPU or one GPU)."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, cfg: RolloutConfig, *, share_prefill: bool = True,
        cast_weights: CastWeights | None = None, decode_attention: bool | None = None,
    ) -> None:
        """share_prefill: prefill a context once for all its adjacent copies and expand its KV cache
        (off only to check that it changes nothing). cast_weights: decode from this copy of `model`
        (`rollout.cast_weights_once`) instead of `model` itself. decode_attention: the plain loop's
        decode steps use `plain_decode_attention` (None: on CPU, for models whose attention is sdpa's
        plain causal softmax; off only to measure it)."""
        self.model = model
        self.decode_attention = decode_attention
        self.cast_weights = cast_weights
        self.share_prefill = share_prefill
        self._static_decoder: StaticDecoder | None = None
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._cache_kw = cache_kwarg(model)
        self._stop_window = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in cfg.stop), default=0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _net(self) -> nn.Module:
        """The module that decodes: the policy, or its cast copy."""
        return self.model if self.cast_weights is None else self.cast_weights.module

    @torch.no_grad()
    def generate(
        self,
        requests: list[GenRequest],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """One list of `n` Generations per request, in request order."""
        rows = [(i, r.context + r.prefix) for i, r in enumerate(requests) for _ in range(r.n)]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        out: list[list[Generation]] = [[] for _ in requests]
        bs = self.cfg.batch_size
        was_training = self.model.training
        self.model.eval()
        if self.cast_weights is not None:
            self.cast_weights.refresh()  # the policy's current weights, cast once for the whole call
        try:
            for start in range(0, len(rows), bs):
                chunk = rows[start : start + bs]
                gens = self._generate_rows(
                    [ctx for _, ctx in chunk],
                    max_new_tokens or self.cfg.max_new_tokens,
                    temperature or self.cfg.temperature,
                    gen,
                )
                for (i, _), g in zip(chunk, gens, strict=True):
                    out[i].append(g)
        finally:
            self.model.train(was_training)
        return out

    def _use_static(self) -> bool:
        """The static-cache path: asked for, or by default on CUDA; never with stop strings, nor for a
        model whose attention is more than plain causal softmax (sliding window, softcap: see
        `guidedrl.nn.cascade.supports`), which the decode's own attention function would not reproduce."""
        want = self.cfg.static_cache if self.cfg.static_cache is not None else self.device.type == "cuda"
        config = unwrap(self.model).config
        attn = getattr(config, "_attn_implementation", None)
        return bool(want) and not self.cfg.stop and attn in ("sdpa", "eager", None) and cascade.supports(config)

    def _decode_attention_name(self) -> str | None:
        """The attention the plain loop's decode steps switch to, if any."""
        config = unwrap(self.model).config
        want = self.decode_attention if self.decode_attention is not None else self.device.type == "cpu"
        plain = getattr(config, "_attn_implementation", None) == "sdpa" and cascade.supports(config)
        return DECODE_ATTN_NAME if want and plain else None

    def _decode_loop(
        self, first: Tensor, cache: Any, attn: Tensor, pos: Tensor, draws: Tensor, temperature: float
    ) -> list[Generation]:
        """`_decode_steps` with the decode attention switched on for all of its steps (the prefill,
        already done, kept sdpa)."""
        name = self._decode_attention_name()
        with attention_implementation(unwrap(self._net).config, name) if name else nullcontext():
            return self._decode_steps(first, cache, attn, pos, draws, temperature)

    def _static(self) -> StaticDecoder:
        if self._static_decoder is None:
            want = self.cfg.compile_decode
            self._static_decoder = StaticDecoder(
                self._net, unwrap(self._net).config,
                compile_step=self.device.type == "cuda" if want is None else want,
            )
        return self._static_decoder

    def _prefill(self, contexts: list[list[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
        """Prefill each distinct context once (a group's G rows share one prompt).

        -> (attn (U, P), pos (U, P), inverse (B,) row -> distinct context, last logits (U, V), cache).
        """
        dev = self.device
        inverse, uniq = [], []
        for c in contexts:
            if not (self.share_prefill and uniq and uniq[-1] == c):  # G copies of a request are adjacent
                uniq.append(c)
            inverse.append(len(uniq) - 1)
        U, P = len(uniq), max(len(c) for c in uniq)
        ids = torch.full((U, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((U, P), dtype=torch.long)
        for u, c in enumerate(uniq):
            ids[u, P - len(c) :] = torch.tensor(c, dtype=torch.long)
            attn[u, P - len(c) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (U, P) left-padding-safe positions
        res = self._net(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: None},
        )
        inv = torch.tensor(inverse, dtype=torch.long, device=dev)
        return attn, pos, inv, res.logits[:, -1, :], getattr(res, self._cache_kw)

    def _generate_rows(self, contexts: list[list[int]], max_new: int, temperature: float, gen: torch.Generator) -> list[Generation]:
        dev = self.device
        attn_u, pos_u, inv, first, cache = self._prefill(contexts)
        eos = torch.tensor(sorted(self.eos_ids), device=dev, dtype=torch.long)
        # one uniform per step and row, drawn up front from the seeded CPU generator: both decode paths
        # sample from the same draws, and a row's tokens do not depend on which other rows still run
        draws = (1.0 - torch.rand((max_new, len(contexts)), generator=gen)).to(dev)  # (N, B) in (0, 1]
        if self._use_static():
            out_ids, out_lp = self._static().decode(
                cache, first, attn_u, inv, max_new=max_new, min_new=self.cfg.min_new_tokens, temperature=temperature,
                top_k=self.cfg.top_k, top_p=self.cfg.top_p, pad_id=self.pad_id, eos=eos, draws=draws,
            )
            lengths, reason = _ends(out_ids, eos)
            return self._finish(out_ids, out_lp, lengths, reason)
        for layer in cache.layers:
            layer.batch_select_indices(inv)  # (U, ...) -> (B, ...): the shared prompt's KV, expanded
        return self._decode_loop(first[inv], cache, attn_u[inv], pos_u[inv], draws, temperature)

    def _decode_steps(
        self, first: Tensor, cache: Any, attn: Tensor, pos: Tensor, draws: Tensor, temperature: float
    ) -> list[Generation]:
        """The plain loop: one model call per token through Python. draws (N, B): the uniforms of
        `inverse_cdf_sample`, one per step and row.

        With `rollout.drop_finished_rows`, rows that have finished leave the batch (and the KV cache)
        once they are an eighth of it, so the forward runs only over rows still generating.
        """
        dev = self.device
        max_new, B = draws.shape
        out_ids = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, max_new), dtype=torch.float32, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        live = torch.arange(B, device=dev)  # (A,) the batch row of each row still in the forward
        reason = ["length"] * B
        lengths = [max_new] * B
        eos = torch.tensor(sorted(self.eos_ids), device=dev, dtype=torch.long)
        pad = torch.tensor(self.pad_id, device=dev)
        raw = first  # (A, V) logits of the prefill's last position
        for t in range(max_new):
            if t > 0:
                res = self._net(
                    input_ids=out_ids[live, t - 1 : t], attention_mask=attn, position_ids=pos[:, -1:] + t,
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
                )
                cache, raw = getattr(res, self._cache_kw), res.logits[:, -1, :]
            logits = raw.float() / temperature  # (A, V)
            if t < self.cfg.min_new_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            logp = logits.log_softmax(-1)  # (A, V)
            probs = filter_logits(logits, self.cfg.top_k, self.cfg.top_p).softmax(-1)
            was_done = done[live]  # (A,)
            nxt = torch.where(was_done, pad, inverse_cdf_sample(probs, draws[t, live][:, None]))  # (A,)
            out_ids[live, t] = nxt
            out_lp[live, t] = logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(was_done, 0.0)
            newly = ~was_done & torch.isin(nxt, eos) if eos.numel() else torch.zeros_like(was_done)
            for b in live[newly].tolist():
                reason[b], lengths[b] = "eos", t + 1
            done[live[newly]] = True
            if self.cfg.stop:
                self._check_stops(out_ids, t, done, reason, lengths)
            if bool(done.all()):
                break
            attn = torch.cat([attn, attn.new_ones((len(live), 1))], dim=1)  # finished rows still in decode pads
            if self.cfg.drop_finished_rows:
                cache, live, attn, pos = _drop_finished(cache, live, attn, pos, done)
        return self._finish(out_ids, out_lp, lengths, reason)

    def _check_stops(self, out_ids: Tensor, t: int, done: Tensor, reason: list[str], lengths: list[int]) -> None:
        """Mark rows whose recent tokens complete a stop string (decodes only a short tail)."""
        window = self._stop_window + 2
        for b in (~done).nonzero().flatten().tolist():
            tail = self.tokenizer.decode(out_ids[b, max(0, t + 1 - window) : t + 1].tolist())
            if any(s in tail for s in self.cfg.stop):
                done[b] = True
                reason[b], lengths[b] = "stop", t + 1

    def _finish(self, out_ids: Tensor, out_lp: Tensor, lengths: list[int], reason: list[str]) -> list[Generation]:
        gens = []
        ids_cpu, lp_cpu = out_ids.cpu(), out_lp.cpu()
        for b, n in enumerate(lengths):
            ids = ids_cpu[b, :n].tolist()
            lps = lp_cpu[b, :n].tolist()
            if reason[b] == "stop":
                ids, lps = self._cut_at_stop(ids, lps)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            gens.append(Generation(ids=ids, logprobs=lps, text=text, finish_reason=reason[b]))  # type: ignore[arg-type]
        return gens

    def _cut_at_stop(self, ids: list[int], lps: list[float]) -> tuple[list[int], list[float]]:
        """Keep the shortest token prefix whose text contains a stop string (the stop string stays)."""
        for k in range(1, len(ids) + 1):
            if any(s in self.tokenizer.decode(ids[:k]) for s in self.cfg.stop):
                return ids[:k], lps[:k]
        return ids, lps


def _drop_finished(cache: Any, live: Tensor, attn: Tensor, pos: Tensor, done: Tensor) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Take finished rows out of the plain loop's batch once they are an eighth of it (each drop copies
    the KV cache once, about one decode step's reads). live (A,) batch rows in the forward; attn (A, L),
    pos (A, P) theirs; done (B,). -> (cache, live, attn, pos) of the rows kept."""
    keep = (~done[live]).nonzero().flatten()  # (A',)
    if (len(live) - len(keep)) * 8 < len(live):
        return cache, live, attn, pos
    for layer in cache.layers:
        layer.batch_select_indices(keep)
    return cache, live[keep], attn[keep], pos[keep]


def _ends(out_ids: Tensor, eos: Tensor) -> tuple[list[int], list[str]]:
    """Lengths and finish reasons from generated ids (B, N): a row ends at its first eos, if any."""
    N = out_ids.shape[1]
    if not eos.numel():
        return [N] * out_ids.shape[0], ["length"] * out_ids.shape[0]
    is_eos = torch.isin(out_ids, eos)  # (B, N)
    hit = is_eos.any(-1).cpu().tolist()
    first = is_eos.int().argmax(-1).cpu().tolist()
    lengths = [f + 1 if h else N for f, h in zip(first, hit, strict=True)]
    return lengths, ["eos" if h else "length" for h in hit]
