"""Guidance pieces, hand-computed: schedules, graded shares, escalation, triggers, pivots, token
routing (guide tokens get no policy-gradient weight), and the guided metrics a run logs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from guidedrl.algo.reduce import build_reducer
from guidedrl.algo.losses import ppo_clip
from guidedrl.trainer.batch import collate
from guidedrl.core.config import PPOClipLoss, ReduceConfig, RolloutConfig
from guidedrl.core.config import Prefix, PromptHint, Replace, ResponsePrefix, Schedule, Trigger
from guidedrl.guidance.guide import ComposedGuide
from guidedrl.guidance.protocol import StepInfo
from guidedrl.guidance.pieces import cut, fires, graded_share, hint_text, prefix_fractions, schedule_strength
from guidedrl.guidance.refine import _mask_before_pivot, pivot_chars
from guidedrl.nn.logprobs import policy_outputs
from guidedrl.nn.models import render_prompt
from guidedrl.nn.prompts import Renderer
from guidedrl.trainer.collect import PolicyServices, RewardTimer, collect
from guidedrl.rollout.hf import HFEngine
from guidedrl.core.types import Completion, LossInputs, Sample


def test_sigmoid_decay_by_hand() -> None:
    s = Schedule(kind="sigmoid_decay", midpoint=0.2, steepness=125.0)
    # x = step/(total-1). step 0: 1/(1+e^(-25)) = 1 - 1.4e-11; x = 0.2: 1/(1+e^0) = 0.5;
    # step 10 of 11 (x=1): 1/(1+e^100) ~ 3.7e-44
    assert schedule_strength(s, 0, 11) == pytest.approx(1.0, abs=1e-10)
    assert schedule_strength(s, 2, 11) == pytest.approx(0.5)
    assert schedule_strength(s, 10, 11) == pytest.approx(math.exp(-100), rel=1e-6)
    # x = 0.1 -> 1/(1+e^(-12.5)) = 0.9999962733
    assert schedule_strength(s, 1, 11) == pytest.approx(1 / (1 + math.exp(-12.5)))


def test_linear_decay_phase_and_fixed() -> None:
    assert schedule_strength(Schedule(kind="linear_decay"), 3, 5) == pytest.approx(0.25)  # 1 - 3/4
    ph = Schedule(kind="phase", switch_step=3)
    assert [schedule_strength(ph, i, 10) for i in range(5)] == [1, 1, 1, 0, 0]
    assert schedule_strength(Schedule(), 9, 10) == 1.0


def test_graded_shares_ruscarl() -> None:
    # (n-1-i)/(n-1) for n = 8: 1, 6/7, ..., 1/7, 0
    assert [graded_share(i, 8) for i in range(8)] == pytest.approx([(7 - i) / 7 for i in range(8)])
    assert graded_share(0, 1) == 1.0


def test_prefix_fractions_and_cut() -> None:
    rng = random.Random(0)
    assert prefix_fractions(Prefix(escalate=[0.25, 0.5, 0.75]), rng) == [0.25, 0.5, 0.75]
    assert prefix_fractions(Prefix(fraction=0.4), rng) == [0.4]
    r = prefix_fractions(Prefix(random_range=(0.25, 0.75)), random.Random(1))[0]
    assert r == pytest.approx(0.25 + 0.5 * random.Random(1).random())
    # 10 chars, 25% -> round(2.5) = 2 (banker's rounding) chars; 50% -> 5
    assert cut("0123456789", 0.25, None, "chars") == "01" and cut("0123456789", 0.5, None, "chars") == "01234"
    assert cut("abc", 0.0, None, "chars") == ""


def test_hint_share() -> None:
    s = Sample(id="a", prompt="p", hints=["h1", "h2", "h3", "h4"])
    assert hint_text(s, 1.0) == "h1\nh2\nh3\nh4" and hint_text(s, 0.5) == "h1\nh2" and hint_text(s, 0.1) is None


def _group(rewards: list[float]) -> list[Completion]:
    s = Sample(id="a", prompt="p")
    return [Completion(sample=s, group=0, gen_context=[1], ids=[2], behaviour_logprobs=[0.0], text="", finish_reason="eos", reward=r)
            for r in rewards]


def test_triggers() -> None:
    rng = random.Random(0)
    assert fires(Trigger(kind="all_fail"), _group([0, 0, 0]), rng)
    assert not fires(Trigger(kind="all_fail"), _group([0, 1, 0]), rng)
    assert fires(Trigger(kind="below_threshold", threshold=1.0), _group([0.5, 0.9]), rng)
    assert not fires(Trigger(kind="below_threshold", threshold=0.8), _group([0.5, 0.9]), rng)
    assert fires(Trigger(kind="always"), _group([1.0]), rng)
    hits = sum(fires(Trigger(kind="probability", p=0.3), _group([0]), random.Random(i)) for i in range(2000))
    assert 520 < hits < 680  # Binomial(2000, 0.3): mean 600, sd 20.5


def test_pivot_by_hand() -> None:
    ref = "3+4=7. 7*2=14. 14-5=9. #### 9"
    att = "3+4=7. 7*2=15. 15-5=10. #### 10"
    # the attempt leaves the reference at "15" (char 12); the last step end before it is the "." at 5
    assert pivot_chars(att, ref) == 6 and att[:6] == "3+4=7."
    assert pivot_chars("9", ref) == 0 and pivot_chars(att, None) == 0
    c = _group([0])[0]
    c.ids, c.behaviour_logprobs, c.loss_mask = [5, 6, 7, 8], [0.0] * 4, [1.0, 1.0, 1.0, 1.0]
    _mask_before_pivot(c, 2)
    assert c.mask == [0.0, 0.0, 1.0, 1.0]


def test_prefix_tokens_get_zero_policy_gradient(tiny) -> None:
    """A guided completion whose first 3 tokens are a teacher-forced prefix: those positions get
    exactly zero gradient from the policy loss; the policy's own tokens do not."""
    model, tok = tiny
    s = Sample(id="a", prompt="What is 2+3?")
    ctx = render_prompt(tok, s, chat=True)
    c = Completion(sample=s, group=0, gen_context=ctx, ids=[40, 41, 42, 43, 44], behaviour_logprobs=[0.0] * 3 + [-5.0, -5.0],
                   text="", finish_reason="eos", loss_mask=[0.0, 0.0, 0.0, 1.0, 1.0], origin="guided")
    b = collate([c], tok.pad_token_id)
    out = policy_outputs(model, b)
    lp = out.logprobs.detach().requires_grad_(True)
    inp = LossInputs(logprobs=lp, behaviour_logprobs=b.behaviour_logprobs, advantages=torch.ones_like(lp), mask=b.mask,
                     offpolicy=b.offpolicy)
    red = build_reducer(ReduceConfig(name="token_mean"), b.mask, 5.0)
    ppo_clip(inp, PPOClipLoss(), red).loss.backward()
    assert torch.all(lp.grad[0, :3] == 0) and torch.all(lp.grad[0, 3:] != 0)


class Rig:
    """A guide run end to end on the tiny model: the trainer's services, a step's info, and a
    reward that is 1 iff a completion's text holds the guidance marker "GO"."""

    def __init__(self, tiny, rewards: dict[str, float], group_size: int = 4) -> None:
        model, tok = tiny
        self.engine = CountingEngine(HFEngine(model, tok, RolloutConfig(max_new_tokens=6)))
        self.renderer = Renderer(tok, chat=False)

        def reward(samples, texts):
            return [rewards.get("guided" if "GO" in t else "plain", 0.0) for t in texts], [{} for _ in texts]

        self.services = PolicyServices(self.engine, self.renderer, RewardTimer(reward), model, 1.0)
        self.group_size = group_size

    def guide(self, cfg) -> ComposedGuide:
        return ComposedGuide(cfg, self.renderer, self.group_size)

    def collect(self, samples, guide, step: int = 0):
        info = StepInfo(step=step, total_steps=10, rng=random.Random(0))
        return collect(samples, self.services, guide, info, group_size=self.group_size, seed=0)


class CountingEngine:
    """The engine, counting its generate calls."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0

    def generate(self, *a, **k):
        self.calls += 1
        return self.engine.generate(*a, **k)


def test_escalation_stops_at_first_success_and_routes_tokens(tiny) -> None:
    rig = Rig(tiny, {"guided": 1.0})
    s = Sample(id="a", prompt="p", reference="xx GO yy zz ww")
    cfg = ResponsePrefix(source="reference", trigger=Trigger(kind="all_fail"),
                         prefix=Prefix(escalate=[0.1, 0.5, 0.9], unit="chars"))
    g = rig.guide(cfg)
    groups = rig.collect([s], g)
    # 0.1 of 14 chars = "x" (no GO: all fail) -> escalate to 0.5 = "xx GO y" (GO: all pass) -> stop
    (group,) = groups
    assert all(c.reward_info["guide_fraction"] == 0.5 for c in group)
    assert all(c.origin == "guided" and c.text.startswith("xx GO y") for c in group)
    k = len(rig.renderer.encode("xx GO y"))
    assert all(c.mask[:k] == [0.0] * k and c.behaviour_logprobs[:k] == [0.0] * k for c in group)
    assert g.metrics()["guide/trigger_rate"] == 1.0


def test_one_engine_call_per_escalation_round_across_groups(tiny) -> None:
    """Four all-failing groups escalate together: the plain round, then one call per prefix fraction
    (0.1: no GO anywhere; 0.5: every group succeeds) -- 3 engine calls, not 1 + 4 x 2."""
    rig = Rig(tiny, {"guided": 1.0})
    samples = [Sample(id=f"a{i}", prompt=f"p{i}", reference="xx GO yy zz ww") for i in range(4)]
    cfg = ResponsePrefix(source="reference", trigger=Trigger(kind="all_fail"),
                         prefix=Prefix(escalate=[0.1, 0.5, 0.9], unit="chars"))
    groups = rig.collect(samples, rig.guide(cfg))
    assert len(groups) == 4 and all(c.reward == 1.0 for g in groups for c in g)
    assert rig.engine.calls == 3


def test_strip_context_makes_cross_context_rows(tiny) -> None:
    rig = Rig(tiny, {})
    s = Sample(id="a", prompt="p", hints=["use GO"])
    cfg = PromptHint(source="hint", trigger=Trigger(kind="all_fail"), context="strip", offpolicy=True)
    (group,) = rig.collect([s], rig.guide(cfg))
    plain = rig.renderer.render(s)
    for c in group:
        assert c.context == plain and c.gen_context != plain and c.offpolicy
        assert any(x != 0.0 for x in c.behaviour_logprobs)  # behaviour log-probs under the hinted context are kept


def test_replace_puts_reference_in_one_failed_slot(tiny) -> None:
    rig = Rig(tiny, {})
    s = Sample(id="a", prompt="p", reference="the answer is 5")
    cfg = Replace(source="reference", trigger=Trigger(kind="always"), count=1)
    (group,) = rig.collect([s], rig.guide(cfg))
    refs = [c for c in group if c.origin == "reference"]
    assert len(group) == 4 and len(refs) == 1
    r = refs[0]
    assert r.offpolicy and r.sft and r.behaviour_logprobs == [0.0] * len(r.ids) and r.ids[-1] == rig.renderer.eos_id


def test_pope_versions_are_separate_groups(tiny) -> None:
    rig = Rig(tiny, {})
    s = Sample(id="a", prompt="p", reference="GO GO GO GO")
    cfg = ResponsePrefix(source="reference", trigger=Trigger(kind="always"), keep_unguided=True)
    groups = rig.collect([s], rig.guide(cfg))
    assert len(groups) == 2 and {c.origin for c in groups[0]} == {"guided"} and {c.origin for c in groups[1]} == {"policy"}
    assert groups[0][0].group != groups[1][0].group and all(len(g) == 4 for g in groups)
