"""Every fast path against the plain path it replaces (CPU, float32).

- shared-prompt prefill (one prefill per group, KV expanded G times) vs one prefill per row:
  the same samples under the same seed, log-probs to 1e-5;
- the static-cache decode (compiled on CPU in one test, on GPU in tests/gpu) vs the plain loop:
  token for token under greedy decoding, log-probs to 1e-4, behaviour log-probs = a fresh forward;
  with equal groups (one shared prompt store, cascade attention) and without, 1 and 3 tokens a call;
  and the same sampled tokens (both sample from the same up-front draws);
- the plain loop with finished rows dropped from its batch vs kept: the same tokens;
- cascade decode attention (eager and compiled) vs sdpa over every row's own [prompt; response]
  keys over repeated KV heads;
- the compiled log-prob / entropy chunk vs the eager one (values and gradients);
- compiled decoder layers (`train.compile_model`) vs eager ones: log-probs and gradients;
- the inverse-CDF sampler draws from the right distribution;
- chunked selected-token log-probs / entropy vs the full-vocabulary reference;
- the shared-prompt training forward (prompt once per group, KV expanded) vs every row's full
  sequence: log-probs and every parameter's gradient to 1e-5;
- length-sorted, trimmed micro-batches, by rows or by a token budget, vs one whole micro-batch:
  the same gradients to 1e-5;
- skipped work: no old-log-prob pass with one epoch, no reference model without KL.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guidedrl.trainer.batch import collate
from guidedrl.core.config import RolloutConfig, load_config
from guidedrl.nn.logprobs import token_logprobs
from guidedrl.nn.models import render_prompt
from guidedrl.trainer.build import build
from guidedrl.rollout.base import GenRequest
from guidedrl.guidance.protocol import Plan
from guidedrl.nn.prompts import Renderer
from guidedrl.trainer.collect import to_completion
from guidedrl.rollout.hf import HFEngine
from guidedrl.rollout.sampling import inverse_cdf_sample
from guidedrl.rollout.static import cascade_decode_attention
from guidedrl.trainer.loop import seed_everything
from guidedrl.trainer.step import StepState, train_step
from guidedrl.core.types import Sample


def _reqs(tok) -> list[GenRequest]:
    prompts = ["What is 2+3?", "Hi", "Start at 3. Add 4. Times 2."]  # unequal lengths: left padding
    ctxs = [render_prompt(tok, Sample(id=str(i), prompt=p), chat=True) for i, p in enumerate(prompts)]
    prefix = tok("Start", add_special_tokens=False)["input_ids"]
    return [GenRequest(ctxs[0], n=4), GenRequest(ctxs[1], n=3, prefix=prefix), GenRequest(ctxs[2], n=1)]


def _flat(out):
    return [x for g in out for x in g]


def _max_lp_diff(a, b) -> float:
    return max((abs(x - y) for ga, gb in zip(a, b, strict=True) for x, y in zip(ga.logprobs, gb.logprobs, strict=True)),
               default=0.0)


def test_shared_prefill_gives_the_same_samples_as_one_prefill_per_row(tiny) -> None:
    model, tok = tiny
    cfg = RolloutConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, static_cache=False)
    shared = HFEngine(model, tok, cfg).generate(_reqs(tok), seed=7)
    per_row = HFEngine(model, tok, cfg, share_prefill=False).generate(_reqs(tok), seed=7)
    a, b = _flat(shared), _flat(per_row)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.finish_reason for x in a] == [x.finish_reason for x in b]
    assert _max_lp_diff(a, b) < 1e-5


def _group_reqs(tok) -> list[GenRequest]:
    """3 prompts of unequal length x 4 samples: equal adjacent groups, the cascade path."""
    prompts = ["What is 2+3?", "Hi", "Start at 3. Add 4. Times 2."]
    return [GenRequest(render_prompt(tok, Sample(id=str(i), prompt=p), chat=True), n=4) for i, p in enumerate(prompts)]


def _decode_pair(model, tok, reqs, *, unroll: int | None, compile_step: bool = False, graph_forward: bool | None = None,
                 **kw):
    """(plain loop, static decode) generations with eos made likely, so both finish reasons occur."""
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 1.0  # eos becomes argmax for some rows at some steps (2.5 ends every row at once)
    h = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        plain = _flat(HFEngine(model, tok, RolloutConfig(static_cache=False, **kw)).generate(reqs, seed=0))
        eng = HFEngine(model, tok, RolloutConfig(static_cache=True, compile_decode=compile_step, **kw))
        eng._static().unroll = unroll
        eng._static().graph_forward = graph_forward
        fast = _flat(eng.generate(reqs, seed=0))
        assert eng._static().compile_step == compile_step, "a failed compile fell back to the eager step"
    finally:
        h.remove()
    return plain, fast


@pytest.mark.parametrize("unroll", [1, 3])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("min_new", [0, 10])
def test_static_decode_equals_the_plain_loop_greedily(tiny, min_new: int, groups: bool, unroll: int) -> None:
    model, tok = tiny
    reqs = _group_reqs(tok) if groups else _reqs(tok)  # equal groups: one prompt-store row per group
    plain, fast = _decode_pair(model, tok, reqs, unroll=unroll, max_new_tokens=14, min_new_tokens=min_new, top_k=1)
    assert [x.ids for x in plain] == [x.ids for x in fast]
    assert [x.finish_reason for x in plain] == [x.finish_reason for x in fast]
    assert _max_lp_diff(plain, fast) < 1e-4
    if min_new:
        assert all(len(x.ids) >= min_new for x in fast)
    else:  # rows end at eos at different steps and others run to the limit: the early exit is exercised
        assert {x.finish_reason for x in fast} == {"eos", "length"}


@pytest.mark.parametrize("groups", [False, True])
def test_static_decode_samples_the_plain_loops_tokens(tiny, groups: bool) -> None:
    """Both paths sample by inverse CDF from the same up-front draws: the same tokens when sampling."""
    model, tok = tiny
    reqs = _group_reqs(tok) if groups else _reqs(tok)
    plain, fast = _decode_pair(model, tok, reqs, unroll=None, max_new_tokens=14, temperature=0.9, top_p=0.95)
    assert [x.ids for x in plain] == [x.ids for x in fast]
    assert _max_lp_diff(plain, fast) < 1e-4
    assert len({tuple(x.ids) for x in fast}) > len(reqs)  # sampled: a group's rows differ


def test_dropping_finished_rows_changes_no_token_and_shrinks_the_forward(tiny) -> None:
    model, tok = tiny
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 2.0  # rows end at eos at scattered steps, some run to the limit
    rows: list[int] = []
    hooks = [model.lm_head.register_forward_hook(lambda m, i, o: o + bias),
             model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)]
    out = {}
    try:
        for drop in (False, True):
            cfg = RolloutConfig(max_new_tokens=24, temperature=0.9, top_p=0.95, static_cache=False, drop_finished_rows=drop)
            rows.clear()
            out[drop] = (_flat(HFEngine(model, tok, cfg).generate(_group_reqs(tok), seed=3)), list(rows))
    finally:
        for h in hooks:
            h.remove()
    (kept, rows_kept), (dropped, rows_dropped) = out[False], out[True]
    assert [x.ids for x in kept] == [x.ids for x in dropped]
    assert [x.finish_reason for x in kept] == [x.finish_reason for x in dropped]
    assert _max_lp_diff(kept, dropped) < 1e-5
    lengths = [len(x.ids) for x in dropped]
    assert len(set(lengths)) >= 3 and max(lengths) == 24  # ragged, with a row to the limit
    assert rows_kept[1:] == [12] * (len(rows_kept) - 1)  # after the prefill (3 prompts) all 12 rows every step
    assert rows_dropped[1:] == sorted(rows_dropped[1:], reverse=True) and rows_dropped[-1] < 12
    assert sum(rows_dropped) < sum(rows_kept)


@pytest.mark.parametrize("graph_forward", [False, True])
def test_compiled_decode_equals_the_plain_loop_greedily(tiny, graph_forward: bool) -> None:
    """The compiled fast paths on CPU: as the CPU benchmark runs it (whole step compiled, 4 tokens a
    call, reading the written slots) and as CUDA runs it (only the forward compiled, in
    "reduce-overhead" mode, which on CPU compiles without a CUDA graph; the sampler eager)."""
    model, tok = tiny
    plain, fast = _decode_pair(model, tok, _group_reqs(tok), unroll=None, compile_step=True,
                               graph_forward=graph_forward, max_new_tokens=10, top_k=1)
    assert [x.ids for x in plain] == [x.ids for x in fast]
    assert _max_lp_diff(plain, fast) < 1e-4


def test_static_decode_behaviour_logprobs_match_a_fresh_forward_and_are_seeded(tiny) -> None:
    from guidedrl.nn.logprobs import policy_outputs

    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, temperature=0.7, top_k=40, static_cache=True))
    reqs = _reqs(tok)
    out = eng.generate(reqs, seed=1)
    assert [x.ids for x in _flat(out)] == [x.ids for x in _flat(eng.generate(reqs, seed=1))]
    assert [x.ids for x in _flat(out)] != [x.ids for x in _flat(eng.generate(reqs, seed=2))]
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1, prefix=reqs[i].prefix), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    with torch.no_grad():
        lp = policy_outputs(model, b, temperature=0.7).logprobs
    sampled = b.mask > 0  # forced-prefix tokens carry 0.0, not a model log-prob
    assert torch.allclose(lp[sampled], b.behaviour_logprobs[sampled], atol=1e-4)


def test_shared_prompt_training_forward_equals_the_plain_forward_with_gradients(tiny) -> None:
    from guidedrl.nn.logprobs import _shared_prompts, response_hidden

    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=10, temperature=1.0))
    reqs = _reqs(tok)  # groups of 4, 3 (with a forced prefix) and 1, prompts of unequal length
    out = eng.generate(reqs, seed=3)
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1, prefix=reqs[i].prefix), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    first, inverse = _shared_prompts(b)
    assert sorted(first.tolist()) == [0, 4, 7], "3 distinct prompts over 8 rows, each found at its first row"
    assert first[inverse].tolist() == [0] * 4 + [4] * 3 + [7]
    weights = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def run(share: bool):
        model.zero_grad()
        h = response_hidden(model, b, share_prompts=share)  # (B, R, H)
        lp, _, _ = token_logprobs(model.get_output_embeddings(), h, b.response_ids)
        (lp * b.response_mask * weights).sum().backward()
        return lp.detach() * b.response_mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp_plain, g_plain = run(False)
    lp_shared, g_shared = run(True)
    assert torch.allclose(lp_plain, lp_shared, atol=1e-5)
    for name, g in g_plain.items():
        assert torch.allclose(g, g_shared[name], atol=1e-5), name


def test_length_sorted_trimmed_micro_batches_give_the_whole_batch_gradients(tiny) -> None:
    from guidedrl.core.config import AlgoConfig
    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.trainer.objective import Objective
    from guidedrl.trainer.update import Optim, micro_batches, optimizer_step

    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, temperature=1.0))
    reqs = _reqs(tok)
    out = eng.generate(reqs, seed=5)
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1, prefix=reqs[i].prefix), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    b.advantages = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(0)) * b.mask  # (B, R)
    # trimming drops only all-padding columns: the kept columns' log-probs are the same
    row = int(b.attention_mask[:, : b.prompt_len].sum(-1).argmin())  # the shortest prompt
    short = b.select([row]).trimmed()  # alone: its left padding goes
    assert short.prompt_len < b.prompt_len and short.response_ids.shape[1] <= b.response_ids.shape[1]
    with torch.no_grad():
        full = policy_outputs(model, b.select([row])).logprobs
        cut = policy_outputs(model, short).logprobs
    assert torch.allclose(full[:, : cut.shape[1]] * short.response_mask, cut * short.response_mask, atol=1e-5)
    rows = micro_batches(b, 3)
    assert sorted(r for mb in rows for r in mb) == list(range(len(b))) and max(map(len, rows)) <= 3
    obj = Objective.from_config(AlgoConfig(), temperature=1.0, max_new_tokens=12)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the step leaves the weights, we read the gradients
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def grads(micro: int) -> list[torch.Tensor]:
        metrics, finite = optimizer_step(model, Optim(params, opt, sched), obj, b, micro_batch_size=micro, grad_clip=None)
        assert finite
        return [p.grad.clone() for p in params]

    whole = grads(len(b))  # one micro-batch, nothing to trim
    for a, c in zip(whole, grads(3), strict=True):  # 3 length-sorted, trimmed micro-batches
        assert torch.allclose(a, c, atol=1e-5)
    # token-budget micro-batches (`train.micro_batch_tokens`): whole groups, several micro-batches
    budget = int(b.attention_mask.sum(-1).max()) * 4
    tok_rows = micro_batches(b, len(b), tokens=budget)
    assert len(tok_rows) > 1 and sorted(r for mb in tok_rows for r in mb) == list(range(len(b)))
    metrics, finite = optimizer_step(model, Optim(params, opt, sched), obj, b, micro_batch_size=len(b), grad_clip=None,
                                     micro_batch_tokens=budget)
    assert finite
    for a, p in zip(whole, params, strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_no_grad_passes_over_sorted_trimmed_micro_batches_give_every_row_its_own_logprobs(tiny) -> None:
    """The reference / old log-prob passes run length-sorted, trimmed micro-batches and put the
    results back in row order: equal to one forward over the whole untrimmed batch."""
    from guidedrl.core.config import AlgoConfig
    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.trainer.objective import Objective
    from guidedrl.trainer.update import recompute_behaviour, reference_logprobs

    model, tok = tiny
    reqs = _reqs(tok)
    out = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, temperature=1.0)).generate(reqs, seed=5)
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1, prefix=reqs[i].prefix), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    assert len({int(n) for n in b.response_mask.sum(-1)}) > 1  # ragged: trimming and sorting both act
    with torch.no_grad():
        whole = policy_outputs(model, b).logprobs * b.response_mask  # (B, R)
    obj = Objective.from_config(AlgoConfig(), temperature=1.0, max_new_tokens=12)
    ref = reference_logprobs(model, b, obj, 3)
    assert ref.shape == whole.shape and torch.allclose(ref, whole, atol=1e-5)
    b.behaviour_logprobs = torch.zeros_like(whole)
    recompute_behaviour(model, b, obj, 3, rows_only=False)
    assert torch.allclose(b.behaviour_logprobs, whole, atol=1e-5)


def test_token_budget_micro_batches_hold_whole_groups_up_to_the_budget() -> None:
    from types import SimpleNamespace

    from guidedrl.trainer.update import micro_batches

    # 4 groups of 2 rows; real tokens per row: group 0 10 and 9, group 1 4 and 3, group 2 7 and 7, group 3 20 and 5
    real = [10, 9, 4, 3, 7, 7, 20, 5]
    mask = torch.tensor([[1] * n + [0] * (20 - n) for n in real])
    b = SimpleNamespace(group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), attention_mask=mask)
    # by longest row: group 1 (4), group 2 (7), group 0 (10), group 3 (20); budget 30:
    #   group 1: 2 rows x 4 = 8; + group 2: 4 rows x 7 = 28 <= 30, joins;
    #   + group 0: 6 x 10 = 60 > 30, starts one (2 x 10 = 20); + group 3: 4 x 20 = 80, starts one,
    #   alone over the budget (2 x 20 = 40): a group is never split
    assert micro_batches(b, 8, tokens=30) == [[2, 3, 4, 5], [0, 1], [6, 7]]
    assert micro_batches(b, 8, tokens=1000) == [[2, 3, 4, 5, 0, 1, 6, 7]]
    assert micro_batches(b, 3) == [[2, 3, 4], [5, 0, 1], [6, 7]]  # by rows: groups may split


def test_a_token_budget_satisfies_whole_group_losses_whatever_the_row_size() -> None:
    from guidedrl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(None, ["algo.loss.name=nft", "rollout.group_size=4", "train.micro_batch_size=6"])
    cfg = load_config(None, ["algo.loss.name=nft", "rollout.group_size=4", "train.micro_batch_size=6",
                             "train.micro_batch_tokens=4096"])
    assert cfg.train.micro_batch_tokens == 4096


def test_stop_strings_and_sliding_window_models_use_the_plain_loop(tiny, monkeypatch) -> None:
    model, tok = tiny
    assert not HFEngine(model, tok, RolloutConfig(static_cache=True, stop=["e"]))._use_static()
    assert HFEngine(model, tok, RolloutConfig(static_cache=True))._use_static()
    assert not HFEngine(model, tok, RolloutConfig())._use_static(), "default on CPU is the plain loop"
    monkeypatch.setattr(model.config, "use_sliding_window", True, raising=False)
    assert not HFEngine(model, tok, RolloutConfig(static_cache=True))._use_static()


@pytest.mark.parametrize("compiled", [False, True])
def test_cascade_decode_attention_equals_attention_over_each_rows_prompt_and_own_keys(compiled: bool) -> None:
    """One decode token per row: written into the response store at slot t - 1, then attention over its
    group's prompt (left-padded for prompt 0) and the row's first n response slots (slots >= t masked).
    Compiled on CPU the value products are broadcast multiply-and-sums, eager matmuls: both checked."""
    g = torch.Generator().manual_seed(0)
    U, G, Hq, Hkv, P, L, D, n, t = 2, 3, 4, 2, 5, 8, 8, 6, 4
    B, neg = U * G, torch.finfo(torch.float32).min
    q = torch.randn(B, Hq, 1, D, generator=g)
    key, value = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)  # this token's
    pk, pv = torch.randn(U, Hkv, P, D, generator=g), torch.randn(U, Hkv, P, D, generator=g)
    own_k, own_v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)  # earlier slots
    p_vis = torch.ones(U, 1, 1, P, dtype=torch.bool)
    p_vis[0, ..., :2] = False  # prompt 0 is left-padded by 2
    pmask = torch.zeros(U, 1, 1, P).masked_fill(~p_vis, neg)
    rmask = torch.zeros(B, 1, 1, n).masked_fill(torch.arange(n) >= t, neg)  # slots 0..t-1 visible
    layer = torch.nn.Module()
    layer.layer_idx = 1
    ks, vs = [own_k * 0, own_k.clone()], [own_v * 0, own_v.clone()]
    store = ([pk * 0, pk], [pv * 0, pv], pmask, ks, vs, torch.tensor(t))
    fn = torch.compile(cascade_decode_attention, fullgraph=True) if compiled else cascade_decode_attention
    out, _ = fn(layer, q, key, value, rmask, scaling=0.3, guidedrl_decode=store)
    assert torch.equal(vs[1][:, :, t - 1 : t], value) and torch.equal(ks[1][:, :, t - 1 : t], key)
    # reference: every row gets its own copy of its group's prompt keys in front of its own keys
    row_group = torch.arange(B) // G
    k_own, v_own = own_k[:, :, :n].clone(), own_v[:, :, :n].clone()
    k_own[:, :, t - 1 : t], v_own[:, :, t - 1 : t] = key, value
    kk, vv = torch.cat([pk[row_group], k_own], 2), torch.cat([pv[row_group], v_own], 2)
    mask = torch.cat([pmask[row_group], rmask], -1)  # (B, 1, 1, P+n)
    rep = Hq // Hkv  # transformers' repeat_kv: query head h reads KV head h // rep
    ref = F.scaled_dot_product_attention(q, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), attn_mask=mask,
                                         scale=0.3)
    assert out.shape == (B, 1, Hq, D)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    # layer 0 reads and writes its own buffers (all zeros but this token: another result)
    layer.layer_idx = 0
    out0, _ = fn(layer, q, key, value, rmask, scaling=0.3, guidedrl_decode=store)
    assert torch.equal(vs[0][:, :, t - 1 : t], value) and not torch.allclose(out0, out, atol=1e-3)


def test_inverse_cdf_sampler_samples_the_distribution() -> None:
    # the first k with cum[k] >= u * total has probability p_k; 40k draws: std of a share <= 0.0025
    p = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.15, 0.05, 0.0])  # zero mass first, inside and last
    g = torch.Generator().manual_seed(0)
    n = 40_000
    u = 1.0 - torch.rand(n, 1, generator=g)  # U(0, 1], as the decoder draws it
    picks = inverse_cdf_sample((3.0 * p).expand(n, 7), u)  # unnormalized on purpose
    freq = torch.bincount(picks, minlength=7).float() / n
    assert torch.allclose(freq, p, atol=0.012)
    assert freq[p == 0].sum() == 0.0, "a zero-probability token is never drawn"
    edge = inverse_cdf_sample(p[None], torch.tensor([[1.0]]))  # u = 1: the last token with mass
    assert edge.item() == 5


def test_chunked_logprobs_and_entropy_match_the_full_vocabulary_reference() -> None:
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(3, 7, 16, generator=g), torch.randint(0, 50, (3, 7), generator=g)
    lp, ent, vm = token_logprobs(head, hidden, targets, temperature=0.8, entropy=True, vocab_mean=True, chunk_tokens=6)
    full = (head(hidden).float() / 0.8).log_softmax(-1)  # (3, 7, 50): the plain path
    assert torch.allclose(lp, full.gather(-1, targets[..., None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5)
    assert torch.allclose(vm, full.mean(-1), atol=1e-5)


def test_checkpointed_chunks_give_the_gradients_of_the_full_vocabulary_loss() -> None:
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)

    def grads(**kw):
        head.zero_grad()
        hidden.grad = None
        lp, ent, _ = token_logprobs(head, hidden, targets, temperature=0.8, **kw)
        ((lp * weights).sum() - 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()

    full = grads(entropy=True, chunk_tokens=10_000)  # one chunk: no recomputation
    chunked = grads(entropy=True, chunk_tokens=6)  # 3 chunks of 2 positions, each checkpointed
    for a, b in zip(full, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    lp, ent, _ = token_logprobs(head, hidden, targets, temperature=0.8, entropy="metric", chunk_tokens=6)
    assert not ent.requires_grad and torch.allclose(ent, full[1], atol=1e-6), "a logged entropy needs no graph"
    assert torch.allclose(lp.detach(), full[0])
    compiled = grads(entropy=True, chunk_tokens=6, compiled=True)  # inductor-fused chunks, checkpointed
    for a, b in zip(full, compiled, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_one_epoch_skips_the_old_logprob_pass_and_no_kl_loads_no_reference(monkeypatch) -> None:
    import guidedrl.trainer.update as T

    calls = []
    monkeypatch.setattr(T, "recompute_behaviour", lambda *a, **k: calls.append(1) or {})
    cfg = load_config(None, ["model.path=tiny", "data.eval=null", "eval.enabled=false", "run.progress=false",
                             "rollout.max_new_tokens=6", "rollout.group_size=2", "train.prompts_per_step=2"])
    seed_everything(0)
    parts = build(cfg)
    assert parts.ref is None
    train_step(parts, StepState())
    assert calls == []


@pytest.mark.slow  # a dynamic-shape compile of 2 layers' forward and backward: ~30 s on 2 cores
def test_compiled_layers_give_the_eager_logprobs_and_gradients(tiny) -> None:
    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.nn.models import compile_layers

    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=10, temperature=1.0))
    reqs = _reqs(tok)  # unequal prompts, a forced prefix, groups of 4, 3 and 1
    out = eng.generate(reqs, seed=4)
    comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=reqs[i].context, n=1, prefix=reqs[i].prefix), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    weights = torch.randn(b.response_ids.shape, generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        lp = policy_outputs(model, b).logprobs  # (B, R), through the shared-prompt forward
        (lp * b.response_mask * weights).sum().backward()
        return lp.detach() * b.response_mask, [p.grad.clone() for p in model.parameters()]

    lp_eager, g_eager = run()
    assert compile_layers(model) == 2
    lp_comp, g_comp = run()
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers), "the layers were not compiled"
    assert torch.allclose(lp_eager, lp_comp, atol=1e-5)
    for a, c in zip(g_eager, g_comp, strict=True):
        assert torch.allclose(a, c, atol=1e-5)


def test_compile_model_on_a_model_without_layers_is_a_clear_error() -> None:
    from guidedrl.core.errors import ModelError
    from guidedrl.nn.models import compile_layers

    class NoLayers(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ModelError, match="train.compile_model"):
        compile_layers(NoLayers())


def test_a_failed_logprob_compile_warns_and_falls_back_to_eager(monkeypatch) -> None:
    import guidedrl.nn.logprobs as LP

    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("inductor could not generate code")

    monkeypatch.setattr(LP, "_COMPILED", {"fn": broken})
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden, targets = torch.randn(2, 5, 8, generator=g), torch.randint(0, 20, (2, 5), generator=g)
    with pytest.warns(UserWarning, match="using the eager one"):
        lp, _, _ = token_logprobs(head, hidden, targets, compiled=True)
    assert LP._COMPILED["fn"] is LP._chunk_stats, "later chunks go straight to the eager function"
    assert torch.allclose(lp, token_logprobs(head, hidden, targets)[0])


def _grouped_batch(model, tok, seed: int):
    """A collated batch of 3 groups of 4 (unequal prompts) with random advantages on counted tokens."""
    reqs = _group_reqs(tok)
    out = HFEngine(model, tok, RolloutConfig(max_new_tokens=8, temperature=1.0)).generate(reqs, seed=seed)
    comps = [to_completion(Sample(id=str(i), prompt=""), i, Plan(gen_context=reqs[i].context, n=1), x, Renderer(tok, chat=False))
             for i, g in enumerate(out) for x in g]
    b = collate(comps, tok.pad_token_id)
    b.advantages = torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(seed)) * b.mask  # (B, R)
    return b


def _step(model, b, *, skip: bool, opt_cls=torch.optim.SGD, lr: float = 0.0, algo=None, opt=None):
    from guidedrl.core.config import AlgoConfig
    from guidedrl.trainer.objective import Objective
    from guidedrl.trainer.update import Optim, optimizer_step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or opt_cls(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    obj = Objective.from_config(algo or AlgoConfig(), temperature=1.0, max_new_tokens=8, skip_inert=skip)
    metrics, finite = optimizer_step(model, Optim(params, opt, sched), obj, b, micro_batch_size=3, grad_clip=None)
    assert finite
    return metrics, [p.grad.clone() for p in params], opt


def test_inert_rows_are_left_out_with_the_same_gradient(tiny, monkeypatch) -> None:
    from guidedrl.trainer.objective import Objective

    model, tok = tiny
    b = _grouped_batch(model, tok, seed=3)
    b.advantages[4:8] = 0.0  # group 1: equal rewards, so zero advantage on every token
    seen: list[int] = []
    orig = Objective.micro_loss
    monkeypatch.setattr(Objective, "micro_loss", lambda self, m, mb, *a: (seen.append(len(mb)), orig(self, m, mb, *a))[1])
    m_all, g_all, _ = _step(model, b, skip=False)
    assert sum(seen) == 12
    seen.clear()
    m_skip, g_skip, _ = _step(model, b, skip=True)
    assert sum(seen) == 8, "the 4 zero-advantage rows were not forwarded"
    assert m_skip["perf/skipped_rows"] == pytest.approx(4 / 12) and m_all["perf/skipped_rows"] == 0.0
    for a, c in zip(g_all, g_skip, strict=True):
        assert torch.allclose(a, c, atol=1e-6)
    assert m_skip["loss/policy"] == pytest.approx(m_all["loss/policy"], abs=1e-6), "inert rows add no loss"


def test_a_step_of_only_inert_rows_moves_adamw_as_the_full_step_does(tiny) -> None:
    import copy

    model, tok = tiny
    b = _grouped_batch(model, tok, seed=4)
    twin = copy.deepcopy(model)
    _, _, opt_a = _step(model, b, skip=True, opt_cls=torch.optim.AdamW, lr=1e-2)  # moments now nonzero
    _, _, opt_b = _step(twin, b, skip=False, opt_cls=torch.optim.AdamW, lr=1e-2)
    b.advantages.zero_()  # every group with equal rewards
    m, grads, _ = _step(model, b, skip=True, opt=opt_a)
    _step(twin, b, skip=False, opt=opt_b)
    assert m["perf/skipped_rows"] == 1.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7), "the momentum step without a forward differs"


def test_rows_are_not_inert_when_another_term_or_the_loss_reads_them(tiny) -> None:
    from guidedrl.core.config import AlgoConfig, PACSLoss, PPOClipLoss
    from guidedrl.trainer.objective import Objective

    model, tok = tiny
    b = _grouped_batch(model, tok, seed=5)
    b.advantages.zero_()

    def inert(**kw) -> int:
        return int(Objective.from_config(AlgoConfig(**kw), 1.0, 8, skip_inert=True).inert_rows(b).sum())

    assert inert() == 12
    assert inert(entropy_coef=0.01) == 0, "an entropy bonus has a gradient on every row"
    assert inert(loss=PACSLoss()) == 0, "PACS reads rewards, not only advantages"
    assert inert(loss=PPOClipLoss(offpolicy_weight={"gamma_percentile": 0.9})) == 0, "a percentile gamma couples rows"
    assert int(Objective.from_config(AlgoConfig(), 1.0, 8, skip_inert=False).inert_rows(b).sum()) == 0


def test_compiled_layers_stay_compiled_past_dynamos_graph_limit(tiny, caplog) -> None:
    """The layers share one forward, specialized per layer and use (prefill, decode, update): a deep
    model needs far more graphs of it than dynamo's default limit of 8 per code object, after which
    layers fall back to eager with only a logged warning. Here the limit starts at 1 so that the tiny
    model's 2 layers (more than 9 graphs: 4 a layer were too few) exceed it."""
    import logging

    import torch._dynamo

    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.nn.models import compile_layers

    model, tok = tiny
    torch._dynamo.reset()  # no graphs of earlier tests' layers counted against the limit
    # config.patch, not monkeypatch: monkeypatch's undo deletes the setting from torch's config module
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):
        compile_layers(model)
        reqs = _group_reqs(tok)
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            out = HFEngine(model, tok, RolloutConfig(max_new_tokens=3)).generate(reqs, seed=0)  # prefill + decode
            comps = [to_completion(Sample(id="s", prompt=""), i // 4, Plan(gen_context=reqs[i // 4].context, n=1), x, Renderer(tok, chat=False))
                     for i, x in enumerate(_flat(out))]
            policy_outputs(model, collate(comps, tok.pad_token_id)).logprobs.sum().backward()  # the update
    assert torch._dynamo.config.recompile_limit == limit  # restored for later tests
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


def test_a_training_step_with_a_token_budget_matches_the_row_count_one(monkeypatch) -> None:
    """`train.micro_batch_tokens` end to end: the same step (rewards, loss, gradient norm) as row-count
    micro-batches; only the summation order differs."""
    import guidedrl.trainer.update as update

    cuts: list[list[list[int]]] = []
    real = update.micro_batches
    monkeypatch.setattr(update, "micro_batches", lambda *a, **k: cuts.append(real(*a, **k)) or cuts[-1])
    out = {}
    for extra in ([], ["train.micro_batch_tokens=150"]):
        cfg = load_config(None, ["model.path=tiny", "data.eval=null", "eval.enabled=false", "run.progress=false",
                                 "rollout.max_new_tokens=16", "rollout.group_size=4", "train.prompts_per_step=4",
                                 "train.micro_batch_size=16", "reward.terms=[{name: 'helpers_rewards:sevens'}]", *extra])
        seed_everything(0)
        parts = build(cfg)
        out[bool(extra)], _ = train_step(parts, StepState())
    assert len(cuts[0]) == 1 and len(cuts[1]) > 1  # one micro-batch of rows; several under the budget
    assert out[True]["policy/grad_norm"] > 0
    for k in ("reward/mean", "loss/policy", "policy/grad_norm"):
        assert out[True][k] == pytest.approx(out[False][k], rel=1e-4, abs=1e-6), k
