"""Rewards: math-verify, exact / normalized match, regex format, reasoning-gym verifiers, weighted sums, errors."""

from __future__ import annotations

import doctest
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from guidedrl.core.config import RewardTerm
from guidedrl.data.tasks.reasoning_gym import make_samples as rg_samples
from guidedrl.core.errors import ConfigError, RewardError
from guidedrl.rewards import REWARDS, build_reward, exact_reward, math_reward, reasoning_gym_reward, regex_format_reward
from guidedrl.rewards import combine, match
from guidedrl.rewards import math as math_mod
from guidedrl.rewards import reasoning_gym as rg_mod
from guidedrl.core.types import Sample


def S(answer: str | None = None, id: str = "s", **extra: Any) -> Sample:
    return Sample(id=id, prompt="?", answer=answer, extra=extra)


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("gold", ["1/2", "0.5", "\\frac{1}{2}", "$\\frac12$"])
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", 1.0),
        ("so it is 0.5", 1.0),
        ("half: $\\frac{1}{2}$", 1.0),
        ("\\boxed{0.50}", 1.0),
        ("\\boxed{1/3}", 0.0),
        ("it is 2", 0.0),
        ("no idea, sorry", 0.0),
        ("", 0.0),
    ],
)
def test_math_equivalent_forms(gold: str, completion: str, expected: float) -> None:
    scores, infos = math_reward([S(gold)], [completion])
    assert scores == [expected]
    assert set(infos[0]) == {"math/extracted"}


def test_math_symbolic_and_boxed_priority() -> None:
    samples = [S("x^2+1"), S("2\\pi"), S("42"), S("42")]
    completions = ["so \\boxed{1+x^2}", "that is $2\\pi$", "\\boxed{42}, although earlier I said 41", "41 then 40"]
    assert math_reward(samples, completions)[0] == [1.0, 1.0, 1.0, 0.0]


def test_math_no_answer_is_none_and_unparseable_gold_warns() -> None:
    assert math_reward([S(None)], ["\\boxed{1}"])[0] == [None]
    with pytest.warns(UserWarning, match="cannot parse the gold answer"):
        assert math_reward([S("$$")], ["\\boxed{1}"])[0] == [None]


def test_math_answer_tag() -> None:
    samples = [S("1/2")] * 4
    completions = [
        "<think>maybe 3</think><answer>\\frac{1}{2}</answer>",
        "<answer>3</answer> but really \\boxed{1/2}",  # the tag is read, not the box
        "\\boxed{1/2} without the tag",  # format not followed: 0
        "<answer>0.4</answer><answer> 0.5 </answer>",  # the last tag wins
    ]
    scores, infos = math_reward(samples, completions, answer_tag="answer")
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert infos[2] == {"math/extracted": None}


def test_math_outside_the_main_thread() -> None:
    """math-verify's SIGALRM timeout raises in threads; we pass timeout None there."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(math_reward([S("1/2"), S("3")], ["\\boxed{0.5}", "4"])[0]))
    t.start()
    t.join()
    assert out == [[1.0, 0.0]]


# ----------------------------------------------------------------------------- exact / regex


@pytest.mark.parametrize(
    ("completion", "extract", "normalize", "expected"),
    [
        ("Paris", "all", False, 1.0),
        ("  Paris \n", "all", False, 1.0),  # surrounding whitespace never counts
        ("paris", "all", False, 0.0),
        ("paris.", "all", True, 1.0),
        ("The  capital is\nParis", "all", True, 0.0),
        ("The capital is\n\nParis\n", "last_line", False, 1.0),
        ("The capital is\nParis, France", "last_line", True, 0.0),
        ("reasoning #### Paris\nthanks", "after:####", False, 1.0),
        ("#### Rome then #### PARIS.", "after:####", True, 1.0),
        ("Paris", "after:####", False, 0.0),  # marker missing: no answer extracted
    ],
)
def test_exact(completion: str, extract: str, normalize: bool, expected: float) -> None:
    scores, _ = exact_reward([S("Paris")], [completion], extract=extract, normalize=normalize)
    assert scores == [expected]


def test_exact_normalizes_the_gold_too_and_none_without_answer() -> None:
    assert exact_reward([S("New   York.")], ["new york"], normalize=True)[0] == [1.0]
    assert exact_reward([S(None)], ["x"])[0] == [None]


def test_regex_format_modes() -> None:
    samples = [S()] * 3
    texts = ["<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>", "x <think></think><answer>4</answer>"]
    pattern = r"(?s)<think>.*</think>\s*<answer>.*</answer>"
    assert regex_format_reward(samples, texts, pattern, mode="fullmatch") == [1.0, 0.0, 0.0]
    assert regex_format_reward(samples, texts, pattern, mode="search") == [1.0, 0.0, 1.0]
    assert regex_format_reward(samples, texts, pattern, mode="match") == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_leg_counting_uses_its_verifier() -> None:
    (s,) = rg_samples("leg_counting", size=1, seed=1)
    gold = s.answer
    assert gold is not None
    wrong = str(int(gold) + 1)
    scores, infos = reasoning_gym_reward([s] * 4, [f"<answer>{gold}</answer>", gold, f"<answer>{wrong}</answer>", ""])
    assert scores[:2] == [1.0, 1.0]
    assert scores[2] < 1.0 and scores[3] < 1.0
    assert infos[0] == {"reasoning_gym/extracted": gold}


def test_reasoning_gym_partial_credit_comes_from_the_dataset() -> None:
    """basic_arithmetic and leg_counting use reasoning-gym's base verifier: 1 on an exact match,
    len(gold)/len(answer) when the gold is inside the answer, else 0."""
    samples = rg_samples("basic_arithmetic", size=2, seed=1)  # answers '-4' and '3'
    assert [s.answer for s in samples] == ["-4", "3"]
    # '-4' exact -> 1; '4' does not contain '-4' -> 0; 'x3' contains '3' -> 1/2
    scores, _ = reasoning_gym_reward([samples[0], samples[0], samples[1]], ["<answer>-4</answer>", "4", "x3"])
    assert scores == [1.0, 0.0, 0.5]
    (s,) = rg_samples("leg_counting", size=1, seed=1)  # answer '292'; 'x292' -> 3/4
    assert reasoning_gym_reward([s], ["<answer>x292</answer>"])[0] == [0.75]


def test_reasoning_gym_rows_from_a_file_use_metadata() -> None:
    (s,) = rg_samples("basic_arithmetic", size=1, seed=1)
    entry = s.extra["rg_entry"]
    row = Sample(id="f:1", prompt=entry["question"], answer=entry["answer"], extra={"metadata": entry["metadata"]})
    assert reasoning_gym_reward([row, row], ["-4", "5"])[0] == [1.0, 0.0]
    with pytest.raises(ValueError, match="has no reasoning-gym entry"):
        reasoning_gym_reward([S("1", id="plain")], ["1"])


# ----------------------------------------------------------------------------- combine


def test_weighted_sum_by_hand() -> None:
    # two samples; terms: exact (w=2), regex `\d` (w=0.5), math (w=1)
    # sample a (answer "4"), completion "4":   exact 1, regex 1, math 1 -> 2*1 + 0.5*1 + 1*1 = 3.5
    # sample b (answer "5"), completion "five": exact 0, regex 0, math 0 -> 0
    terms = [
        RewardTerm(name="exact", weight=2.0),
        RewardTerm(name="regex_format", weight=0.5, args={"pattern": r"\d"}),
        RewardTerm(name="math"),
    ]
    reward = build_reward(terms, task_default=[])
    totals, infos = reward([S("4", id="a"), S("5", id="b")], ["4", "five"])
    assert totals == [3.5, 0.0]
    assert infos[0]["reward/exact"] == 1.0 and infos[0]["reward/regex_format"] == 1.0 and infos[0]["reward/math"] == 1.0
    assert infos[1]["reward/exact"] == 0.0 and infos[1]["exact/extracted"] == "five"


def test_none_skips_a_term_and_all_none_is_zero_with_a_note() -> None:
    # sample a has no answer: exact/math give None, regex still applies -> 0.5 * 1 = 0.5
    # with only answer-based terms, sample a is all None -> 0.0 and reward/all_none
    terms = [RewardTerm(name="exact"), RewardTerm(name="regex_format", weight=0.5, args={"pattern": "x"})]
    totals, infos = build_reward(terms, [])([S(None, id="a")], ["x"])
    assert totals == [0.5] and infos[0]["reward/exact"] is None and "reward/all_none" not in infos[0]
    totals, infos = build_reward([RewardTerm(name="exact"), RewardTerm(name="math")], [])([S(None, id="a")], ["x"])
    assert totals == [0.0] and infos[0]["reward/all_none"] is True


def test_task_default_and_duplicate_names() -> None:
    totals, _ = build_reward(None, [RewardTerm(name="exact")])([S("a")], ["a"])
    assert totals == [1.0]
    terms = [RewardTerm(name="regex_format", args={"pattern": "a"}), RewardTerm(name="regex_format", args={"pattern": "b"})]
    totals, infos = build_reward(terms, [])([S()], ["a"])
    assert totals == [1.0]
    assert infos[0]["reward/regex_format#0"] == 1.0 and infos[0]["reward/regex_format#1"] == 0.0


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"`reward.terms\[1\].name`: unknown reward `mth`. Did you mean `math`\?"):
        build_reward([RewardTerm(name="exact"), RewardTerm(name="mth")], [])
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].args` \(reward `regex_format`\): pattern '\(' is not a valid"):
        build_reward([RewardTerm(name="regex_format", args={"pattern": "("})], [])
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].args` \(reward `exact`\): .*unexpected keyword"):
        build_reward([RewardTerm(name="exact", args={"normalise": True})], [])
    with pytest.raises(ConfigError, match=r"extract must be"):
        build_reward([RewardTerm(name="exact", args={"extract": "first_line"})], [])
    with pytest.raises(ConfigError, match=r"`reward.terms` is empty"):
        build_reward([], [RewardTerm(name="math")])


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's reward module on sys.path: `my_rewards`."""
    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(samples, completions, per_char=0.1):\n"
        "    return [per_char * len(c) for c in completions], [{'len': len(c)} for c in completions]\n"
        "\n"
        "def picky(samples, completions):\n"
        "    out = []\n"
        "    for s, c in zip(samples, completions):\n"
        "        if c == 'boom':\n"
        "            raise KeyError('exploded on ' + s.id)\n"
        "        out.append(1.0)\n"
        "    return out\n"
        "\n"
        "def batch_only(samples, completions):\n"
        "    if len(samples) > 1:\n"
        "        raise RuntimeError('cannot do batches')\n"
        "    return [1.0]\n"
        "\n"
        "def short(samples, completions):\n"
        "    return [1.0]\n"
        "\n"
        "def nan(samples, completions):\n"
        "    return [float('nan') if c == 'n' else 1.0 for c in completions]\n"
        "\n"
        "def text(samples, completions):\n"
        "    return ['1.0' for c in completions]\n"
        "\n"
        "def quits(samples, completions):\n"
        "    import sys\n"
        "    sys.exit(3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return str(tmp_path / "my_rewards.py")


def test_user_function_by_module_and_by_file(user_module: str) -> None:
    # length_bonus(per_char=0.5) on "abcd" = 0.5 * 4 = 2.0; plus exact 1.0 with weight 3 -> 5.0
    terms = [RewardTerm(name="my_rewards:length_bonus", args={"per_char": 0.5}), RewardTerm(name="exact", weight=3)]
    totals, infos = build_reward(terms, [])([S("abcd")], ["abcd"])
    assert totals == [5.0] and infos[0]["len"] == 4 and infos[0]["reward/my_rewards:length_bonus"] == 2.0
    totals, _ = build_reward([RewardTerm(name=f"{user_module}:length_bonus")], [])([S()], ["ab"])
    assert totals == [pytest.approx(0.2)]


def test_user_function_import_errors(user_module: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].name`: cannot import `no_such_mod`"):
        build_reward([RewardTerm(name="no_such_mod:f")], [])
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].name`: `nope` is not found in `my_rewards`"):
        build_reward([RewardTerm(name="my_rewards:nope")], [])
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].args`: `args` do not fit length_bonus"):
        build_reward([RewardTerm(name="my_rewards:length_bonus", args={"per_word": 1})], [])
    bad = tmp_path / "broken.py"
    bad.write_text("def f(samples, completions):\n    return [\n")
    with pytest.raises(ConfigError, match=r"(?s)`reward.terms\[0\].name`: cannot import .*broken.py.*SyntaxError"):
        build_reward([RewardTerm(name=f"{bad}:f")], [])


def test_exception_raise_mode_names_sample_and_user_traceback(user_module: str) -> None:
    reward = build_reward([RewardTerm(name="my_rewards:picky")], [])
    with pytest.raises(RewardError) as err:
        reward([S(id="ok-1"), S(id="bad-7"), S(id="bad-8")], ["fine", "boom", "boom"])
    msg = str(err.value)
    assert "reward `my_rewards:picky` (reward.terms[0]) raised on sample `bad-7`" in msg
    assert "Traceback (most recent call last)" in msg
    assert 'my_rewards.py", line 8, in picky' in msg and "KeyError: 'exploded on bad-7'" in msg
    assert "combine.py" not in msg  # the user's frames only


def test_sys_exit_in_a_reward_is_a_reward_error(user_module: str) -> None:
    # a reward calling sys.exit(3) ended the whole run with exit code 3 and no message
    with pytest.raises(RewardError) as err:
        build_reward([RewardTerm(name="my_rewards:quits")], [])([S(id="q-1")], ["x"])
    msg = str(err.value)
    assert "reward `my_rewards:quits` (reward.terms[0]) raised on sample `q-1`" in msg and "SystemExit: 3" in msg
    with pytest.warns(RuntimeWarning, match="SystemExit"):
        totals, _ = build_reward([RewardTerm(name="my_rewards:quits")], [], on_error="zero")([S(id="q-1")], ["x"])
    assert totals == [0.0]


def test_exception_zero_mode_scores_zero_warns_and_notes(user_module: str) -> None:
    # picky (w=1) + exact (w=2): sample a "fine"/answer "fine" -> 1 + 2 = 3; sample b "boom" -> picky 0 + exact 0 = 0
    reward = build_reward(
        [RewardTerm(name="my_rewards:picky"), RewardTerm(name="exact", weight=2)], [], on_error="zero"
    )
    with pytest.warns(RuntimeWarning, match=r"failed on 1 of 2 samples, first `b`: KeyError"):
        totals, infos = reward([S("fine", id="a"), S("fine", id="b")], ["fine", "boom"])
    assert totals == [3.0, 0.0]
    assert "reward_error" not in infos[0]
    assert infos[1]["reward_error"] == "my_rewards:picky: KeyError: 'exploded on b'"
    assert infos[1]["reward/my_rewards:picky"] == 0.0


def test_batch_only_failure(user_module: str) -> None:
    with pytest.raises(RewardError, match=r"raised on a batch of 2 samples \(ids a, b, \.\.\.\), though each sample"):
        build_reward([RewardTerm(name="my_rewards:batch_only")], [])([S(id="a"), S(id="b")], ["x", "y"])
    with pytest.warns(RuntimeWarning, match="using the per-sample scores"):
        totals, _ = build_reward([RewardTerm(name="my_rewards:batch_only")], [], on_error="zero")(
            [S(id="a"), S(id="b")], ["x", "y"]
        )
    assert totals == [1.0, 1.0]


def test_bad_return_values(user_module: str) -> None:
    with pytest.raises(RewardError, match=r"reward `my_rewards:short` \(reward.terms\[0\]\) returned 1 scores for 2"):
        build_reward([RewardTerm(name="my_rewards:short")], [], on_error="zero")([S(), S()], ["a", "b"])
    with pytest.raises(RewardError, match=r"returned '1.0' for sample `s`; expected a number or None"):
        build_reward([RewardTerm(name="my_rewards:text")], [])([S()], ["a"])
    with pytest.raises(RewardError, match=r"failed on sample `n1`: returned a non-finite score nan"):
        build_reward([RewardTerm(name="my_rewards:nan")], [])([S(id="y"), S(id="n1")], ["y", "n"])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        totals, _ = build_reward([RewardTerm(name="my_rewards:nan")], [], on_error="zero")([S(), S()], ["y", "n"])
    assert totals == [1.0, 0.0]


def test_lazy_registry_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def arith_reward(samples: list[Sample], completions: list[str], strict: bool = False) -> list[float | None]:
        calls.append({"n": len(samples), "strict": strict})
        return [1.0 if c.strip() == s.answer else 0.0 for s, c in zip(samples, completions)]

    fake = types.ModuleType("guidedrl.data.tasks.arith")
    fake.arith_reward = arith_reward  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "guidedrl.data.tasks.arith", fake)
    totals, _ = build_reward(None, [RewardTerm(name="arith", args={"strict": True})])([S("7"), S("8")], ["7", "9"])
    assert totals == [1.0, 0.0] and calls == [{"n": 2, "strict": True}]
    assert {"math", "exact", "regex_format", "reasoning_gym", "arith", "code"} <= set(REWARDS)
    with pytest.raises(ConfigError, match=r"`reward.terms\[0\].args` \(reward `nothing`\): this reward needs"):
        monkeypatch.setitem(REWARDS, "nothing", combine._lazy("guidedrl.no_such_module", "f"))
        build_reward([RewardTerm(name="nothing")], [])


def test_reasoning_gym_default_reward_end_to_end() -> None:
    from guidedrl.core.config import DataSource
    from guidedrl.data import default_reward, load_samples

    src = DataSource(task="reasoning_gym:basic_arithmetic", task_args={"size": 2, "seed": 1})
    samples = load_samples(src)
    reward = build_reward(None, default_reward(src.task))
    totals, infos = reward(samples, ["<answer>-4</answer>", "<answer>4</answer>"])
    assert totals == [1.0, 0.0] and infos[0]["reward/reasoning_gym"] == 1.0


@pytest.mark.parametrize("module", [match, math_mod, rg_mod])
def test_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_terms_may_be_plain_dicts() -> None:
    # what default_reward-style code may pass: {"name": ...} dicts are validated as RewardTerm
    totals, _ = build_reward(None, [{"name": "exact", "weight": 0.5}])([S("a")], ["a"])  # type: ignore[list-item]
    assert totals == [0.5]
    with pytest.raises(ConfigError, match=r"`reward.terms \(task default\)\[0\]`: Field required"):
        build_reward(None, [{"weight": 1.0}])  # type: ignore[list-item]


def test_default_config_data_and_reward_work_together() -> None:
    """The embedded default: arith samples from the registry, scored by arith's own reward."""
    from guidedrl.core.config import Config
    from guidedrl.data import default_reward, load_samples

    cfg = Config()
    samples = load_samples(cfg.data.train)[:4]
    reward = build_reward(cfg.reward.terms, default_reward(cfg.data.train.task), cfg.reward.on_error)
    refs = [s.reference or "" for s in samples]
    totals, infos = reward(samples, refs)
    assert totals == [1.0] * 4 and all(i["reward/arith"] == 1.0 for i in infos)
    assert reward(samples, ["no answer"] * 4)[0] == [0.0] * 4
