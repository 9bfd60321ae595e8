"""Per-token log-probs (and entropy, values) of the response tokens of a Batch.

The full-vocabulary logits are never materialized for the whole batch: the trunk's hidden states
are projected through the LM head a chunk of positions at a time, in float32, and under autograd
each chunk is checkpointed (recomputed in the backward), so training keeps one chunk of logits.
With `compiled=True` each chunk's head, log-softmax, gather and entropy run as one torch.compile'd
function: inductor fuses the (B, c, V) passes (scale, log-softmax, exp, gather, entropy) into one or
two loops in the forward and in the backward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from guidedrl.nn import cascade as _cascade
from guidedrl.nn.models import attention_implementation, cache_kwarg, trunk_and_head
from guidedrl.core.types import Batch


@dataclass
class PolicyOutputs:
    logprobs: Tensor  # (B, R)
    entropy: Tensor | None = None  # (B, R)
    vocab_mean_logprobs: Tensor | None = None  # (B, R) mean over the vocabulary of log-softmax (ROVER)
    values: Tensor | None = None  # (B, R) critic values from the value head


def _shared_prompts(batch: Batch) -> tuple[Tensor, Tensor] | None:
    """(first row of each run of adjacent rows with one prompt (U,), row -> its run's index (B,)) when
    rows share prompts (GRPO groups: G samples of one prompt, adjacent in every micro-batch), else
    None. Prompts match on ids and mask both, so a guided row whose context differs (a hint, a
    prefix) starts its own run. Adjacent runs, not `torch.unique` over rows: the same grouping for
    batches in group order, for a (B, 2P) comparison instead of a sort of whole rows (5 ms a step)."""
    P = batch.prompt_len
    if P == 0 or len(batch) < 2:
        return None
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], 1)  # (B, 2P)
    starts = torch.ones(len(batch), dtype=torch.bool, device=key.device)
    starts[1:] = (key[1:] != key[:-1]).any(-1)  # (B,) a row whose prompt differs from the row before
    U = int(starts.sum())
    if 2 * U > len(batch):  # little to share: the plain forward is as fast
        return None
    return starts.nonzero().squeeze(-1), starts.cumsum(0) - 1


def response_hidden(model: nn.Module, batch: Batch, *, share_prompts: bool = True, cascade: bool = True) -> Tensor:
    """Hidden states that predict each response token: (B, R, H).

    share_prompts: when rows share their prompt (the G samples of a group), the trunk runs over each
    distinct prompt once and the responses attend to its keys and values; the backward flows into
    the one prompt forward. Same values as the plain forward over every row's full sequence
    (tested), with B*P - U*P fewer tokens through the trunk. How the responses attend to the prompt:
    on CPU with equal groups, right-padded responses and a plain causal model, `cascade` attention
    (`guidedrl.nn.cascade`: the prompt keys once per group, no mask); otherwise the prompt's KV cache
    expanded to the rows and an explicit mask.
    """
    trunk, _ = trunk_and_head(model)
    P, R = batch.prompt_len, batch.response_ids.shape[1]
    shared = _shared_prompts(batch) if share_prompts and not getattr(trunk, "gradient_checkpointing", False) else None
    if shared is None or R < 2:
        out = trunk(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False,
        )
        h = out.last_hidden_state  # (B, P+R, H)
        return h[:, P - 1 : P - 1 + R]  # column P+j is predicted by hidden state at P+j-1
    first, inverse = shared
    pre = trunk(
        input_ids=batch.input_ids[first, :P], attention_mask=batch.attention_mask[first, :P],
        position_ids=batch.position_ids[first, :P], use_cache=True,
    )
    kw = cache_kwarg(trunk)
    cache = getattr(pre, kw)
    last = pre.last_hidden_state[:, P - 1 : P][inverse]  # (B, 1, H) predicts response token 0
    resp = dict(input_ids=batch.input_ids[:, P : P + R - 1], position_ids=batch.position_ids[:, P : P + R - 1])
    if cascade and _cascade_applies(trunk, batch, first):
        prompt_mask = batch.attention_mask[first, :P]  # (U, P)
        pmask = None if bool(prompt_mask.all()) else torch.where(
            prompt_mask.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]  # (U, 1, 1, P) additive
        prefix = ([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], pmask)
        _cascade.register()
        with attention_implementation(trunk.config, _cascade.ATTN_NAME):
            out = trunk(**resp, use_cache=False, guidedrl_prefix=prefix)
        return torch.cat([last, out.last_hidden_state], 1)  # (B, R, H)
    for layer in cache.layers:
        layer.batch_select_indices(inverse)  # (U, ...) -> (B, ...); indexing keeps the graph
    out = trunk(**resp, attention_mask=batch.attention_mask[:, : P + R - 1], use_cache=True, **{kw: cache})
    return torch.cat([last, out.last_hidden_state], 1)  # (B, R, H)


def _cascade_applies(trunk: nn.Module, batch: Batch, first: Tensor) -> bool:
    """Cascade training attention's conditions: CPU, equal adjacent groups (row b continues prompt
    b // G), each row's response tokens before its padding, a plain causal model."""
    B, U = len(batch), len(first)
    if batch.input_ids.device.type != "cpu" or B % U or not _cascade.supports(trunk.config):
        return False
    if not torch.equal(first, torch.arange(0, B, B // U, device=first.device)):
        return False
    am = batch.attention_mask[:, batch.prompt_len :]  # (B, R)
    return bool((am[:, 1:] <= am[:, :-1]).all())  # 1...1 0...0 in every row


def _chunk_stats(
    head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, entropy: str, vocab_mean: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One chunk: hidden (B, c, H), targets (B, c) -> log-probs (B, c) [, entropy (B, c), mean (B, c)].

    entropy: "" (none), "grad" (differentiable) or "metric" (computed without a graph: when the
    entropy is only logged, its backward and the (B, c, V) tensors it would keep are skipped).
    """
    logits = head(hidden).float()  # (B, c, V) float32, this chunk only
    if temperature != 1.0:  # a division by 1 is a full (B, c, V) pass for nothing
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ent = None
    if entropy == "grad":
        ent = -(logp.exp() * logp).sum(-1)
    elif entropy == "metric":
        with torch.no_grad():
            d = logp.detach()
            ent = -(d.exp() * d).sum(-1)
    return lp, ent, logp.mean(-1) if vocab_mean else None


_COMPILED: dict[str, object] = {}


def _compiled_stats(*args: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`_chunk_stats` through torch.compile (built on first use, dynamic shapes). A compile that fails
    (at its first call, before anything runs) warns once and leaves the eager function in its
    place; the eager call then re-raises any error that is not the compiler's."""
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = _COMPILED["fn"] = torch.compile(_chunk_stats, dynamic=True)
    if fn is _chunk_stats:
        return _chunk_stats(*args)  # type: ignore[arg-type]
    try:
        return fn(*args)  # type: ignore[operator]
    except torch._dynamo.exc.TorchDynamoException as e:  # compiler failures only: checkpoint's recompute
        # stops itself with an exception that must pass through
        warnings.warn(f"compiling the log-prob chunk failed ({type(e).__name__}: {e}); using the eager one",
                      stacklevel=2)
        _COMPILED["fn"] = _chunk_stats
        return _chunk_stats(*args)  # type: ignore[arg-type]


def token_logprobs(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool | str = False,
    vocab_mean: bool = False,
    chunk_bytes: int = 2**30,
    chunk_tokens: int | None = None,
    compiled: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """hidden (B, R, H), targets (B, R) -> log-probs (B, R) [, entropy (B, R), vocab-mean log-prob (B, R)].

    entropy: False, True / "grad" (differentiable) or "metric" (no gradient through it).
    Chunks hold at most `chunk_bytes` of float32 logits (or `chunk_tokens` tokens); with more than
    one chunk and gradients on, each chunk is checkpointed: its (B, c, V) logits are recomputed in
    the backward instead of kept, so the peak is one chunk, not the whole (B, R, V) (one extra head
    matmul per chunk). The values are the same either way, and with `compiled` (tested to 1e-5).
    """
    B, R, _ = hidden.shape
    V = getattr(head, "out_features", None) or head.weight.shape[0]
    tokens = chunk_tokens if chunk_tokens is not None else max(1, chunk_bytes // (4 * V))
    step = max(1, tokens // max(B, 1))
    mode = "grad" if entropy is True else (entropy or "")
    recompute = torch.is_grad_enabled() and step < R
    stats = _compiled_stats if compiled else _chunk_stats
    lps, ents, means = [], [], []
    for s in range(0, R, step):
        args = (head, hidden[:, s : s + step], targets[:, s : s + step], temperature, mode, vocab_mean)
        if recompute:
            lp, ent, vm = checkpoint(stats, *args, use_reentrant=False)
        else:
            lp, ent, vm = stats(*args)
        lps.append(lp)
        ents.append(ent)
        means.append(vm)
    return (
        torch.cat(lps, 1),
        torch.cat(ents, 1) if mode else None,  # type: ignore[arg-type]
        torch.cat(means, 1) if vocab_mean else None,  # type: ignore[arg-type]
    )


def policy_outputs(
    model: nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    entropy: bool | str = False,
    vocab_mean: bool = False,
    value_head: nn.Module | None = None,
    share_prompts: bool = True,
    cascade: bool = True,
    compiled: bool = False,
) -> PolicyOutputs:
    """Forward the policy over `batch` and gather what the losses need (share_prompts, cascade: see
    `response_hidden`; off only to measure or check them; compiled: see `token_logprobs`)."""
    _, head = trunk_and_head(model)
    h = response_hidden(model, batch, share_prompts=share_prompts, cascade=cascade)
    lp, ent, vm = token_logprobs(
        head, h, batch.response_ids, temperature=temperature, entropy=entropy, vocab_mean=vocab_mean,
        compiled=compiled,
    )
    values = value_head(h.float()).squeeze(-1) if value_head is not None else None  # (B, R)
    return PolicyOutputs(logprobs=lp, entropy=ent, vocab_mean_logprobs=vm, values=values)
