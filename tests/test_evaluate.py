"""pass@k / mean@k / majority@k against hand-computed values, `evaluate` with a scripted engine,
test-time guidance, and `guidedrl eval` end to end on a run folder with the tiny model."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidedrl.trainer.checkpoint import save_checkpoint
from guidedrl.core.config import (
    Config, DataConfig, DataSource, EvalConfig, ModelConfig, RewardConfig, RewardTerm, RolloutConfig, TinyModel,
    dump_config,
)
from guidedrl.core.errors import ConfigError, DataError, ModelError
from guidedrl.algo.metrics import majority_at_k, mean_at_k, pass_at_k
from guidedrl.app.eval_cmd import find_run_model
from guidedrl.eval.evaluate import evaluate, evaluate_model, guided_inputs, parse_guidance, reference_prefix
from guidedrl.eval.results import EvalResult, eval_to_metrics
from guidedrl.rollout.base import Generation, GenRequest
from guidedrl.core.types import Sample

# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (8, 3, 1, 0.375),  # k = 1 is c/n
        (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
        (3, 1, 3, 1.0),  # n = k with one correct: the only 3-subset holds it
        (3, 0, 3, 0.0),  # n = k, none correct
        (5, 0, 2, 0.0),  # c = 0
        (5, 5, 2, 1.0),  # c = n
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows float; the product form does not. 1 - C(999,1)/C(1000,1) = 1/1000.
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, abs=1e-15)
    exact = 1 - Fraction(math.comb(900, 500), math.comb(1000, 500))
    assert pass_at_k(1000, 100, 500) == pytest.approx(float(exact), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_binomials_and_is_monotone(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    got = pass_at_k(n, c, k)
    assert got == pytest.approx(float(exact), abs=1e-12)
    assert 0.0 <= got <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= got - 1e-12  # more tries never hurt
    if c < n:
        assert pass_at_k(n, c + 1, k) >= got - 1e-12  # more correct samples never hurt
    assert mean_at_k(n, c, k) == pytest.approx(c / n) and pass_at_k(n, c, 1) == pytest.approx(c / n)


# ----------------------------------------------------------------------------- majority@k


def test_majority_at_k_hand_values():
    # answers a, a, b with a correct.
    # k=1: 2/3 of single samples are `a`.  k=2: {a,a} -> 1, {a,b} -> tie 1/2, {a,b} -> 1/2: mean 2/3.
    # k=3: a wins 2-1 -> 1.
    ans, ok = ["a", "a", "b"], [1, 1, 0]
    assert majority_at_k(ans, ok, 1) == pytest.approx(2 / 3)
    assert majority_at_k(ans, ok, 2) == pytest.approx(2 / 3)
    assert majority_at_k(ans, ok, 3) == pytest.approx(1.0)


def test_majority_at_k_can_fall_below_pass_at_k():
    # answers a, b, b, c with only a correct (pass@1 = 1/4).
    # k=2 (6 pairs): {a,b} x2 tie 1/2 each, {a,c} tie 1/2, {b,b} 0, {b,c} x2 0 -> 1.5/6 = 1/4.
    # k=3 (4 triples): {a,b,b} b wins 0, {a,b,c} x2 three-way tie 1/3 each, {b,b,c} 0 -> (2/3)/4 = 1/6.
    # k=4: b wins -> 0, while pass@4 = 1.
    ans, ok = ["a", "b", "b", "c"], [1, 0, 0, 0]
    assert majority_at_k(ans, ok, 1) == pytest.approx(0.25)
    assert majority_at_k(ans, ok, 2) == pytest.approx(0.25)
    assert majority_at_k(ans, ok, 3) == pytest.approx(1 / 6)
    assert majority_at_k(ans, ok, 4) == pytest.approx(0.0)


def test_majority_class_worth_is_its_correct_share():
    # Two samples with the same extracted answer but one scored correct: the class is worth 1/2.
    assert majority_at_k(["x", "x"], [1, 0], 1) == pytest.approx(0.5)
    assert majority_at_k(["x", "x"], [1, 0], 2) == pytest.approx(0.5)


def test_majority_monte_carlo_is_seeded_and_close_to_exact():
    ans = list("aaaabbbccd") + list("aab")  # n = 13, a correct
    ok = [1 if a == "a" else 0 for a in ans]
    exact = majority_at_k(ans, ok, 6, max_subsets=10_000)  # C(13, 6) = 1716 subsets: enumerated
    mc = majority_at_k(ans, ok, 6, max_subsets=800, seed=3)
    assert mc == majority_at_k(ans, ok, 6, max_subsets=800, seed=3)
    assert mc == pytest.approx(exact, abs=0.05)
    assert majority_at_k(["z"] * 30, [1] * 30, 15) == 1.0  # C(30,15) > max_subsets: sampled, still exact here


def test_majority_rejects_k_above_n():
    with pytest.raises(ValueError):
        majority_at_k(["a"], [1], 2)


# ----------------------------------------------------------------------------- evaluate with a scripted engine


class ScriptedEngine:
    """Returns fixed texts per sample (one token id per character) and records the requests."""

    def __init__(self, texts: dict[int, list[str]]) -> None:
        self.texts = texts  # context[0] -> completions
        self.calls: list[tuple[list[GenRequest], dict]] = []

    def generate(self, requests, *, max_new_tokens=None, temperature=None, seed=None):
        self.calls.append((requests, {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}))
        return [[Generation(ids=[ord(ch) for ch in t], logprobs=[0.0] * len(t), text=t, finish_reason="eos")
                 for t in self.texts[r.context[0]][: r.n]] for r in requests]


def _reward(samples, texts):
    """1 for the right answer, 0.5 for the wrong digit `5` (partial credit), None for `?`, else 0."""
    scores = [None if t == "?" else 1.0 if t == s.answer else 0.5 if t == "5" else 0.0 for s, t in zip(samples, texts)]
    return scores, [{"answer": t} for t in texts]


SAMPLES = [
    Sample(id="p1", prompt="2+2", answer="4", level=1),
    Sample(id="p2", prompt="3*3", answer="9", level=1),
    Sample(id="p3", prompt="1+6", answer="7", level=2),
    Sample(id="p4", prompt="1+2", answer="3"),  # no level: only in the overall numbers
]
TEXTS = {0: ["4", "4", "5", "4"], 1: ["1", "2", "9", "2"], 2: ["0", "?", "0", "0"], 3: ["3", "3", "3", "3"]}


def _run_scripted(**kw):
    engine = ScriptedEngine(TEXTS)
    render = lambda s: [SAMPLES.index(s)]  # noqa: E731
    res = evaluate(engine, SAMPLES, _reward, n=4, ks=[4, 1, 2], render=render, temperature=0.7, seed=5,
                   max_new_tokens=9, **kw)
    return engine, res


def test_evaluate_hand_computed_metrics():
    # correct counts: p1 3/4, p2 1/4, p3 0/4, p4 4/4.
    # pass@1: .75 .25 0 1 -> all .5, L1 .5, L2 0.
    # pass@2: p1 1 (n-c=1<2), p2 1-C(3,2)/C(4,2)=.5, p3 0, p4 1 -> all .625, L1 .75.
    # pass@4: 1 1 0 1 -> all .75, L1 1, L2 0.
    # majority@2: p1 [4,4,5,4]: 3 pairs with `5` tie (1/2), 3 pairs of `4` (1) -> 4.5/6 = .75;
    #   p2 [1,2,9,2]: {1,9} {2,9} {9,2} tie 1/2, others 0 -> 1.5/6 = .25; p3 0; p4 1 -> all .5, L1 .5.
    # majority@4: p1 `4` wins 1, p2 `2` wins 0, p3 0, p4 1 -> all .5.
    # score (raw reward): p1 (1+1+.5+1)/4 = .875, p2 .25, p3 0 (None counts 0), p4 1 -> all .53125.
    engine, res = _run_scripted()
    assert res.ks == [1, 2, 4] and res.n == 4
    m, l1, l2 = res.overall.metrics, res.levels[1].metrics, res.levels[2].metrics
    assert (res.overall.count, res.levels[1].count, res.levels[2].count) == (4, 2, 1)
    assert sorted(res.levels) == [1, 2]
    assert m["pass@1"] == pytest.approx(0.5) and l1["pass@1"] == pytest.approx(0.5) and l2["pass@1"] == 0.0
    assert m["pass@2"] == pytest.approx(0.625) and l1["pass@2"] == pytest.approx(0.75)
    assert m["pass@4"] == pytest.approx(0.75) and l1["pass@4"] == pytest.approx(1.0) and l2["pass@4"] == 0.0
    assert m["majority@2"] == pytest.approx(0.5) and l1["majority@2"] == pytest.approx(0.5)
    assert m["majority@4"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx(0.53125) and l1["score"] == pytest.approx((0.875 + 0.25) / 2)
    for k in (1, 2, 4):
        assert m[f"mean@{k}"] == pytest.approx(0.5)  # c/n averaged: (.75+.25+0+1)/4
    assert m["majority@1"] == pytest.approx(m["pass@1"])
    assert [p.correct for p in res.problems] == [3, 1, 0, 4]
    assert res.meta["tokens"] == 16 and res.meta["guided_problems"] == 0
    reqs, kw = engine.calls[0]
    assert kw == {"max_new_tokens": 9, "temperature": 0.7, "seed": 5}
    assert [r.context for r in reqs] == [[0], [1], [2], [3]] and all(r.n == 4 and r.prefix == [] for r in reqs)


def test_eval_to_metrics_keys():
    _, res = _run_scripted()
    m = eval_to_metrics(res)
    assert m["eval/pass@1"] == pytest.approx(0.5)
    assert m["eval/L1/pass@2"] == pytest.approx(0.75)
    assert m["eval/L2/pass@4"] == 0.0
    assert "eval/score" in m and "eval/L1/majority@4" in m
    assert not any(k.startswith("eval/LNone") for k in m)
    assert set(eval_to_metrics(res, prefix="x/")) == {k.replace("eval/", "x/", 1) for k in m}


def test_threshold_is_a_parameter():
    # With threshold 0.5 the partial-credit `5` in p1 counts: p1 4/4 -> pass@1 (1+.25+0+1)/4.
    _, res = _run_scripted(threshold=0.5)
    assert res.overall.metrics["pass@1"] == pytest.approx(0.5625)
    assert res.meta["threshold"] == 0.5


def test_eval_result_json_round_trip_table_and_markdown():
    from rich.console import Console

    _, res = _run_scripted(meta={"model": "scripted", "guidance": "none"})
    back = EvalResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back == res
    console = Console(record=True, width=200)
    console.print(res.table())
    text = console.export_text()
    assert "pass@2" in text and "L2" in text and "0.625" in text
    assert max(len(line) for line in text.splitlines()) <= 80  # fits a terminal with 3 ks and 2 levels
    md = res.markdown()
    assert "| level | problems | pass@1 | pass@2 | pass@4 |" in md
    assert "| all | 4 | 0.500 | 0.625 | 0.750 |" in md
    assert "| L1 | 2 |" in md


def test_forced_prefix_is_scored_with_the_generation():
    # p1's reference prefix "4" is forced; the scripted continuation is then scored as decode(prefix + ids).
    seen: list[str] = []

    def reward(samples, texts):
        seen.extend(texts)
        return [1.0 if t.startswith("4") else 0.0 for t in texts]

    engine = ScriptedEngine({0: ["x", "y"]})
    res = evaluate(engine, SAMPLES[:1], reward, n=2, ks=[1], render=lambda s: [0], prefix=lambda s: [ord("4")],
                   decode=lambda ids: "".join(map(chr, ids)))
    assert engine.calls[0][0][0].prefix == [ord("4")]
    assert seen == ["4x", "4y"] and res.overall.metrics["pass@1"] == 1.0 and res.meta["guided_problems"] == 1
    with pytest.raises(ValueError, match="decode"):
        evaluate(engine, SAMPLES[:1], reward, n=2, ks=[1], render=lambda s: [0], prefix=lambda s: [1])


def test_evaluate_rejects_bad_ks_and_empty_sets():
    engine = ScriptedEngine(TEXTS)
    with pytest.raises(ConfigError, match="k=\\[8\\]"):
        evaluate(engine, SAMPLES, _reward, n=4, ks=[1, 8], render=lambda s: [0])
    with pytest.raises(ConfigError):
        evaluate(engine, SAMPLES, _reward, n=4, ks=[], render=lambda s: [0])
    with pytest.raises(DataError, match="empty"):
        evaluate(engine, [], _reward, n=4, ks=[1], render=lambda s: [0])


@pytest.mark.parametrize("spec", ["prefix:0", "prefix:1.5", "prefix:x", "hints", "prefix"])
def test_parse_guidance_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="--guidance"):
        parse_guidance(spec)


def test_parse_guidance_accepts_good_specs():
    assert parse_guidance("none") == ("none", 0.0)
    assert parse_guidance("hint") == ("hint", 0.0)
    assert parse_guidance("prefix:0.25") == ("prefix", 0.25)


# ----------------------------------------------------------------------------- tiny model


def test_guided_inputs_with_the_tiny_tokenizer(tiny):
    _, tok = tiny
    s = Sample(id="a", prompt="What is 12 + 7?", answer="19", reference="12 + 7 = 19. The answer is 19.",
               hints=["Add the ones first.", "second hint"])
    plain, none_prefix = guided_inputs(tok, "none", chat=True, system_prompt=None)
    hinted, _ = guided_inputs(tok, "hint", chat=True, system_prompt=None)
    assert none_prefix is None
    assert "Add the ones first." in tok.decode(hinted(s)) and "Add the ones" not in tok.decode(plain(s))
    assert "second hint" not in tok.decode(hinted(s))
    _, prefix = guided_inputs(tok, "prefix:0.5", chat=True, system_prompt=None)
    full = tok(s.reference, add_special_tokens=False)["input_ids"]
    assert prefix is not None and prefix(s) == full[: len(full) // 2]
    assert reference_prefix(tok, s.reference, 1.0) == full
    assert prefix(Sample(id="b", prompt="no reference")) == []
    assert hinted(Sample(id="c", prompt="no hints")) == plain(Sample(id="c", prompt="no hints"))


def test_evaluate_with_the_tiny_model_and_hf_engine(tiny):
    from guidedrl.rollout.hf import HFEngine

    model, tok = tiny
    engine = HFEngine(model, tok, RolloutConfig(max_new_tokens=6))
    samples = [Sample(id=f"s{i}", prompt=f"What is {i} + 1?", answer=str(i + 1), level=i % 2,
                      reference=f"{i} + 1 = {i + 1}") for i in range(3)]
    render, prefix = guided_inputs(tok, "prefix:1.0", chat=True, system_prompt=None)
    texts: list[str] = []

    def reward(ss, ts):  # correct iff the text starts with the full reference (forced here)
        texts.extend(ts)
        return [1.0 if t.startswith(s.reference) else 0.0 for s, t in zip(ss, ts)]

    res = evaluate(engine, samples, reward, n=2, ks=[1, 2], render=render, prefix=prefix,
                   decode=lambda ids: tok.decode(ids, skip_special_tokens=True), seed=1)
    assert len(texts) == 6 and res.overall.metrics["pass@2"] == 1.0 and res.meta["guided_problems"] == 3
    assert sorted(res.levels) == [0, 1] and res.levels[0].count == 2
    assert 0 < res.meta["tokens"] <= 6 * 6


# ----------------------------------------------------------------------------- run folders and `guidedrl eval`


def _fake_checkpoint(run: Path, step: int) -> Path:
    """The layout guidedrl.trainer.checkpoint writes: checkpoints/step-N/{model/, state.json, COMPLETE}."""
    ck = run / "checkpoints" / f"step-{step:06d}"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "config.json").write_text("{}")
    (ck / "state.json").write_text(json.dumps({"step": step, "state": {}}))
    (ck / "COMPLETE").write_text("ok\n")
    return ck / "model"


def test_find_run_model_resolution(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    with pytest.raises(ModelError, match="without a saved model"):
        find_run_model(str(run))
    _fake_checkpoint(run, 3)
    newest = _fake_checkpoint(run, 5)
    assert find_run_model(str(run)) == (str(newest.resolve()), run)  # no `latest` file: newest complete
    (run / "checkpoints" / "latest").write_text("step-000003\n")
    assert find_run_model(str(run))[0] == str((run / "checkpoints" / "step-000003" / "model").resolve())
    (run / "final").mkdir()
    assert find_run_model(str(run))[0] == str((run / "final").resolve())  # final/ wins
    assert find_run_model("some/hub-id") == ("some/hub-id", None)
    assert find_run_model(str(tmp_path)) == (str(tmp_path), None)  # a folder without config.yaml: a model folder


@pytest.fixture()
def run_folder(tmp_path, tiny):
    """A finished-looking run: config.yaml (tiny model, JSONL eval set) and a checkpoint (model + tokenizer)."""
    model, tok = tiny
    data = tmp_path / "eval.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1 + i % 2,
             "hints": [f"Double {i}."], "reference": f"{i} + {i} = {2 * i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp_path / "rw.py"  # a user reward: correct iff the text starts with the reference
    reward.write_text("def starts(samples, texts):\n"
                      "    return [float(t.startswith(s.reference)) for s, t in zip(samples, texts)]\n")
    cfg = Config(model=ModelConfig(path="tiny", tiny=TinyModel(hidden_size=64, num_layers=2)),
                 data=DataConfig(train=DataSource(path=str(data)), eval=DataSource(path=str(data))),
                 reward=RewardConfig(terms=[RewardTerm(name=f"{reward}:starts")]),
                 rollout=RolloutConfig(max_new_tokens=5), eval=EvalConfig(limit=3))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_checkpoint(run, 2, model=model, tokenizer=tok)
    return run, data


def test_evaluate_model_on_a_run_folder(run_folder, tmp_path):
    from guidedrl.core.config import load_config

    run, data = run_folder
    cfg = load_config(str(run / "config.yaml"))
    out = tmp_path / "out"
    res = evaluate_model(cfg, find_run_model(str(run))[0], ks=[1, 2], guided="prefix:1.0", out=out, seed=3,
                         label=str(run))
    # the whole reference is forced, so the config's reward (`starts with the reference`) is 1 everywhere
    assert res.overall.count == 3 and res.n == 2
    assert res.overall.metrics["pass@1"] == pytest.approx(1.0)
    assert res.meta["guidance"] == "prefix:1.0" and res.meta["model"] == str(run)
    back = EvalResult.from_json(json.loads((out / "eval.json").read_text()))
    assert back == res and "pass@2" in (out / "eval.md").read_text()


def test_guidedrl_eval_cli(run_folder, tmp_path, capsys):
    from guidedrl.app.cli import main

    run, data = run_folder
    out = tmp_path / "cli"
    code = main(["eval", "--model", str(run), "--task", str(data), "--k", "1,2", "--limit", "2",
                 "--guidance", "hint", "--out", str(out)])
    assert code == 0
    res = EvalResult.from_json(json.loads((out / "eval.json").read_text()))
    assert res.overall.count == 2 and res.ks == [1, 2] and res.meta["guidance"] == "hint"
    assert main(["eval", "--model", str(run), "--k", "1,4", "--n", "2", "--out", str(out)]) == 2
    assert "k=[4] out of range" in capsys.readouterr().err
    assert main(["eval", "--model", str(run), "--k", "1", "--guidance", "prefix:2", "--out", str(out)]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing" / "dir"), "--k", "1", "--out", str(out)]) == 2


def test_evaluate_model_under_autocast_decodes_from_the_cast_copy(run_folder, monkeypatch):
    """`guidedrl eval` of a run trained with `model.autocast`: the same results with the decode copy
    (`rollout.cast_weights_once`, cast once) as with the weights cast at every token."""
    from guidedrl.core.config import load_config
    from guidedrl.rollout.weights import CastWeights

    run, _ = run_folder
    refreshed = []
    real = CastWeights.refresh
    monkeypatch.setattr(CastWeights, "refresh", lambda self: refreshed.append(1) or real(self))
    results = {}
    for once in (True, False):
        cfg = load_config(str(run / "config.yaml"), ["model.autocast=bfloat16", f"rollout.cast_weights_once={once}"])
        # a reward that tells texts apart, so equal scores mean equal samples
        results[once] = evaluate_model(cfg, find_run_model(str(run))[0], ks=[1, 2], guided="none", seed=3,
                                       reward_fn=lambda samples, texts: [sum(map(ord, t)) % 1000 / 1000 for t in texts])
        assert bool(refreshed) == once  # the copy decoded (once per generate call), or no copy was made
        refreshed.clear()
    assert results[True].overall.metrics == results[False].overall.metrics
    assert results[True].overall.metrics["score"] > 0
