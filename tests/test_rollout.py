"""The transformers rollout engine: shapes, stop strings, finish reasons, behaviour log-probs,
determinism, forced prefixes."""

from __future__ import annotations

import torch

from guidedrl.trainer.batch import collate
from guidedrl.core.config import RolloutConfig
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.nn.models import render_prompt
from guidedrl.rollout.base import GenRequest
from guidedrl.guidance.protocol import Plan
from guidedrl.nn.prompts import Renderer
from guidedrl.trainer.collect import to_completion
from guidedrl.rollout.hf import HFEngine
from guidedrl.core.types import Sample


def _ctxs(tok):
    return [render_prompt(tok, Sample(id=str(i), prompt=p), chat=True) for i, p in enumerate(["What is 2+3?", "Hi"])]


def _eos_bias(model, tok, value: float):
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = value
    return model.lm_head.register_forward_hook(lambda m, i, o: o + bias)


def test_shapes_lengths_and_finish_reasons(tiny) -> None:
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=10))
    h = _eos_bias(model, tok, 3.0)  # eos likely, but not certain: both finish reasons appear
    out = eng.generate([GenRequest(c, n=6) for c in _ctxs(tok)], seed=0)
    h.remove()
    assert [len(g) for g in out] == [6, 6]
    reasons = {x.finish_reason for g in out for x in g}
    assert reasons <= {"eos", "length"} and len(reasons) == 2
    for g in out:
        for x in g:
            assert len(x.ids) == len(x.logprobs) and 1 <= len(x.ids) <= 10
            if x.finish_reason == "eos":
                assert x.ids[-1] == tok.eos_token_id and tok.eos_token_id not in x.ids[:-1]
            else:
                assert len(x.ids) == 10 and tok.eos_token_id not in x.ids


def test_min_new_tokens_blocks_eos(tiny) -> None:
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=8, min_new_tokens=8))
    h = _eos_bias(model, tok, 8.0)
    out = eng.generate([GenRequest(_ctxs(tok)[0], n=4)], seed=0)[0]
    h.remove()
    assert all(len(x.ids) == 8 for x in out)


def test_stop_strings_cut_after_the_stop(tiny) -> None:
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=24, stop=["e"]))
    out = eng.generate([GenRequest(_ctxs(tok)[0], n=8)], seed=0)[0]
    stopped = [x for x in out if x.finish_reason == "stop"]
    assert stopped, "a single-letter stop string should trigger on random text"
    for x in stopped:
        full = tok.decode(x.ids)
        assert "e" in full and "e" not in tok.decode(x.ids[:-1]), "cut right after the token completing the stop"


def test_behaviour_logprobs_match_a_fresh_forward(tiny) -> None:
    model, tok = tiny
    for temp in (1.0, 0.7):
        eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, temperature=temp, top_k=50, top_p=0.9))
        ctxs = _ctxs(tok)
        out = eng.generate([GenRequest(c, n=3) for c in ctxs], seed=1)
        comps = [to_completion(Sample(id="s", prompt=""), i, Plan(gen_context=ctxs[i], n=1), x, Renderer(tok, chat=False))
                 for i, g in enumerate(out) for x in g]
        b = collate(comps, tok.pad_token_id)
        with torch.no_grad():
            lp = policy_outputs(model, b, temperature=temp).logprobs
        assert torch.allclose(lp * b.response_mask, b.behaviour_logprobs, atol=1e-4)


def test_same_seed_same_samples_other_seed_differs(tiny) -> None:
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=12, batch_size=4))
    reqs = [GenRequest(c, n=3) for c in _ctxs(tok)]
    a = eng.generate(reqs, seed=3)
    b = eng.generate(reqs, seed=3)
    c = eng.generate(reqs, seed=4)
    ids = lambda out: [x.ids for g in out for x in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_forced_prefix_is_continued_and_masked(tiny) -> None:
    model, tok = tiny
    eng = HFEngine(model, tok, RolloutConfig(max_new_tokens=6))
    ctx = _ctxs(tok)[0]
    prefix = tok("Start at 3.", add_special_tokens=False)["input_ids"]
    plan = Plan(gen_context=ctx, n=2, prefix=prefix, origin="guided")
    out = eng.generate([GenRequest(ctx, n=2, prefix=prefix)], seed=0)[0]
    c = to_completion(Sample(id="s", prompt=""), 0, plan, out[0], Renderer(tok, chat=False))
    assert c.ids[: len(prefix)] == prefix and c.text.startswith("Start at 3.")
    assert c.mask[: len(prefix)] == [0.0] * len(prefix) and all(m == 1.0 for m in c.mask[len(prefix):])
    assert c.behaviour_logprobs[: len(prefix)] == [0.0] * len(prefix)
