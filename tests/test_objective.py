"""The objective is data: a new loss term is one function plus one config entry, with no edit to
the package. The terms are summed with their coefficients, each reduced by its own normalizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guidedrl.algo.terms import TERMS, Term
from guidedrl.core.config import load_config
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import LossInputs, LossOutputs, Reducer
from guidedrl.trainer.build import build
from guidedrl.trainer.loop import seed_everything
from guidedrl.trainer.objective import active_terms
from guidedrl.trainer.step import StepState, train_step


def logprob_l2(inp: LossInputs, args: dict, reduce: Reducer) -> LossOutputs:
    """A term a user might add: pull the sampled tokens' log-probs toward `target` (squared error)."""
    target = float(args.get("target", 0.0))
    return LossOutputs(loss=reduce.tokens((inp.logprobs - target) ** 2, inp.mask), metrics={"l2_calls": 1.0})


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(8)]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _overrides(data: Path) -> list[str]:
    return ["model.path=tiny", f"data.train.path={data}", "data.eval=null", "eval.enabled=false",
            "reward.terms=[{name: regex_format, args: {pattern: e}}]", "rollout.max_new_tokens=8",
            "rollout.group_size=4", "train.prompts_per_step=2", "train.micro_batch_size=8", "train.lr=1e-3",
            "run.progress=false", "train.steps=2", "train.skip_inert_rows=false"]


def _train(cfg) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    seed_everything(0)
    p = build(cfg)
    st, logs = StepState(), []
    for _ in range(2):
        m, _ = train_step(p, st)
        logs.append(m)
        st.step += 1
    return {n: x.detach().clone() for n, x in p.policy.model.named_parameters()}, logs


def test_a_term_registered_from_a_test_file_trains(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TERMS, "logprob_l2", Term(logprob_l2))
    with_term = load_config(None, _overrides(data_file) + ["algo.terms=[{name: logprob_l2, coef: 0.5, args: {target: -1.0}}]"])
    assert [t.name for t in active_terms(with_term.algo)] == ["policy", "logprob_l2"]
    weights, logs = _train(with_term)
    assert all("loss/logprob_l2" in m and m["loss/logprob_l2"] > 0 for m in logs)
    assert all(m["policy/l2_calls"] == pytest.approx(1.0) for m in logs)  # a term's own metrics, namespaced
    plain, _ = _train(load_config(None, _overrides(data_file)))
    assert any(not torch.equal(weights[n], plain[n]) for n in weights)  # the term changed the update


def test_a_term_by_module_path(data_file: Path) -> None:
    cfg = load_config(None, _overrides(data_file) + ["algo.terms=[{name: 'test_objective:logprob_l2', coef: 0.1}]"])
    _, logs = _train(cfg)
    assert all("loss/logprob_l2" in m for m in logs)


def test_unknown_term_is_a_config_error() -> None:
    cfg = load_config(None, ["algo.terms=[{name: nope}]"])
    with pytest.raises(ConfigError, match=r"algo.terms\[0\].name"):
        active_terms(cfg.algo)


def test_terms_sum_with_their_coefficients() -> None:
    """policy 2.0 (given), entropy coef 0.5 on entropy mean 0.3 (the term is -0.3), kl coef 0.1 on a
    k1 estimate: total = 2.0 + 0.5 * -0.3 + 0.1 * kl."""
    from guidedrl.algo import terms as T
    from guidedrl.algo.reduce import build_reducer
    from guidedrl.core.config import KLConfig, ReduceConfig

    mask = torch.ones(1, 2)
    red = build_reducer(ReduceConfig(name="token_mean"), mask, 2.0)
    inp = LossInputs(logprobs=torch.tensor([[-1.0, -2.0]]), behaviour_logprobs=torch.zeros(1, 2),
                     advantages=torch.zeros(1, 2), mask=mask, entropy=torch.tensor([[0.2, 0.4]]),
                     ref_logprobs=torch.tensor([[-1.5, -1.5]]))
    # entropy mean (0.2 + 0.4) / 2 = 0.3 -> the entropy term is -0.3
    assert T.entropy(inp, None, red).loss.item() == pytest.approx(-0.3)
    # k1 = logp - ref = [0.5, -0.5] -> mean 0.0
    assert T.kl(inp, KLConfig(coef=0.1, estimator="k1"), red).loss.item() == pytest.approx(0.0)
    # k2 = 0.5 (ref - logp)^2 = [0.125, 0.125] -> mean 0.125
    assert T.kl(inp, KLConfig(coef=0.1, estimator="k2"), red).loss.item() == pytest.approx(0.125)
