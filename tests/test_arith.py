"""The embedded `arith` task: determinism, disjoint splits, levels that need more steps, the verifier."""

from __future__ import annotations

import doctest

import pytest

from guidedrl.data.tasks import arith
from guidedrl.data.tasks.arith import LEVELS, arith_reward, extract_answer, make_samples
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample


def test_doctests() -> None:
    assert doctest.testmod(arith).failed == 0


def test_deterministic_under_seed() -> None:
    a, b = make_samples("train", 60, seed=3), make_samples("train", 60, seed=3)
    assert [(s.id, s.prompt, s.reference, s.hints) for s in a] == [(s.id, s.prompt, s.reference, s.hints) for s in b]
    assert [s.prompt for s in make_samples("train", 60, seed=4)] != [s.prompt for s in a]


def test_levels_evenly_spread_and_distinct() -> None:
    samples = make_samples("test", 13, levels=[2, 5])
    assert [s.level for s in samples] == [2] * 7 + [5] * 6
    assert len({s.prompt for s in samples}) == 13
    assert {s.level for s in make_samples("train", 2 * LEVELS)} == set(range(1, LEVELS + 1))


def test_splits_disjoint() -> None:
    train = {s.prompt for s in make_samples("train", 3000, seed=0)}
    test = {s.prompt for s in make_samples("test", 600, seed=0)} | {s.prompt for s in make_samples("test", 600, seed=1)}
    assert len(train) == 3000 and len(test) > 600
    assert not train & test


def test_each_level_needs_more_steps() -> None:
    # level l has exactly l worked steps (one `name=x op y=z` per step) and a longer reference on average
    mean_len = []
    for level in range(1, LEVELS + 1):
        samples = make_samples("test", 30, levels=[level])
        for s in samples:
            assert s.reference.count("=") == 2 * level, s.reference
        mean_len.append(sum(len(s.reference) for s in samples) / len(samples))
    assert all(b > a for a, b in zip(mean_len, mean_len[1:])), mean_len


def test_reference_is_right_and_wrong_answer_is_not() -> None:
    samples = make_samples("test", 60)
    assert arith_reward(samples, [s.reference for s in samples]) == [1.0] * 60
    wrong = [s.reference.rsplit("#### ", 1)[0] + f"#### {int(s.answer) + 1}" for s in samples]
    assert arith_reward(samples, wrong) == [0.0] * 60
    assert arith_reward(samples[:1], [""]) == [0.0]


def test_worked_example_by_hand() -> None:
    # 7 +5 = 12, *2 = 24, -3 = 21
    p = arith.Problem(7, (arith.Op("+", 5), arith.Op("*", 2), arith.Op("-", 3)), ("k", "p", "x", "q"), (2, 0, 1))
    s = arith.make_sample(p, "test", 0)
    assert s.prompt == "k=7. q=x-3. p=k+5. x=p*2. q=?\n"
    assert s.reference == "p=7+5=12 x=12*2=24 q=24-3=21 #### 21"
    assert s.answer == "21" and s.level == 3
    assert s.hints == ["Hint: p=7+5=12\n", "Hint: p=7+5=12\n"]


def test_prefix_of_reference_is_a_valid_response_start() -> None:
    s = make_samples("test", 1, levels=[LEVELS])[0]
    half = s.reference[: len(s.reference) // 2]
    assert s.reference.startswith(half) and arith_reward([s], [half + s.reference[len(half):]]) == [1.0]
    assert s.prompt.endswith("\n") and not s.reference.startswith((" ", "\n"))


def test_values_stay_small() -> None:
    for s in make_samples("train", 300):
        nums = [int(t) for t in s.reference.replace("=", " ").replace("+", " ").replace("-", " ").replace("*", " ").split() if t.isdigit()]
        assert all(0 <= n <= arith.MAX_VALUE for n in nums), s.reference


@pytest.mark.parametrize(
    ("text", "want"),
    [("p=7+5=12 #### 12", "12"), ("#### 07", "7"), ("####-3", "-3"), ("#### 5 #### 6", "5"), ("p=7+5=12", None), ("#### x", None), ("", None)],
)
def test_extract_answer(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


def test_hints_exist_weakest_first() -> None:
    for s in make_samples("test", 60):
        assert len(s.hints) == 2 and all(h.startswith("Hint: ") for h in s.hints)
        assert s.hints[1].startswith(s.hints[0].rstrip("\n"))  # the second hint extends the first
        assert s.reference.startswith(s.hints[1][len("Hint: "):].rstrip("\n"))


def test_bad_arguments_raise_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="split"):
        make_samples("valid")
    with pytest.raises(ConfigError, match="levels"):
        make_samples(levels=[0])
    monkeypatch.setattr(arith, "NAMES", "ab")  # a tiny problem space: 2 names, values 0..3
    monkeypatch.setattr(arith, "MAX_VALUE", 3)
    with pytest.raises(ConfigError, match="distinct"):
        make_samples("test", 100, levels=[1])
    with pytest.raises(ValueError):
        arith_reward([Sample(id="a", prompt="p", answer="1")], [])
