"""How tests are split between the program's process and the judge (no sandbox needed), and the
plain-data encoding the values travel in."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, OrderedDict, deque
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guidedrl.core.errors import DataError
from guidedrl.sandbox.cases import NO_CONSTANT, parse_asserts, parse_io, same_output, top_level_names
from guidedrl.sandbox.harness import decode, encode

SPLITS = [  # (assert, the judge's expression, the leaves)
    ("assert f(x) == 9", "L0 == 9", ("f(x)",)),
    ("assert abs(area(2) - 12.57) < 0.01", "abs(L0 - 12.57) < 0.01", ("area(2)",)),
    ("assert math.isclose(area(1), 3.14)", "math.isclose(L0, 3.14)", ("area(1)",)),
    ("assert Solution().two_sum([1, 2], 3)[0] == 0", "L0 == 0", ("Solution().two_sum([1, 2], 3)[0]",)),
    ("assert sorted((f(z) for z in range(3))) == expected", "sorted(L0) == expected", ("(f(z) for z in range(3))",)),
    ("assert [g(i) for i in range(3)] == [0, 1, 2]", "L0 == [0, 1, 2]", ("[g(i) for i in range(3)]",)),
    ("assert list(map(lambda q: h(q), [1])) == [1]", "list(L0) == [1]", ("map(lambda q: h(q), [1])",)),
    ("assert set(sim((3, 4), (4, 5))) == set((4,))", "set(L0) == set((4,))", ("sim((3, 4), (4, 5))",)),
    ("assert f(f(2)) == f(2) + 1", "L0 == L1 + 1", ("f(f(2))", "f(2)")),
    ("assert max(f(1), 2) == 2", "max(L0, 2) == 2", ("f(1)",)),
    ("assert len([1, 2]) == 2", "len([1, 2]) == 2", ()),
    ("assert y == 9", "L0 == 9", ("y",)),
]


def test_leaves_are_the_smallest_parts_that_need_the_program() -> None:
    setup = "import math\nx = 3\nexpected = [1, 2]\ny = f(x)\n"
    cases, judge_setup = parse_asserts(setup + "\n".join(a for a, _, _ in SPLITS), "t")
    got = [(c.source, c.expr.replace("_guidedrl_leaf_", "L"), c.leaves) for c in cases]
    assert got == SPLITS
    # `y = f(x)` needs the program: it runs only in the program's process, with what it needs
    assert judge_setup == ("import math", "x = 3", "expected = [1, 2]")
    assert cases[0].setup == ("x = 3",) and cases[-1].setup == ("x = 3", "y = f(x)")
    assert cases[4].setup == ()  # `expected` is the judge's alone


def test_leaf_equals_constant_is_compared_by_the_parent() -> None:
    tests = "c = 5\nassert f(1) == 2\nassert -1 == f(2)\nassert f(3) == (1, [2.5], {'a': None})\nassert f(4) == c\n" \
            "assert f(5) != 2\nassert f(6) == f(7)\nassert f(8) + 1 == 2\nassert f(9) == set()"
    cases, _ = parse_asserts(tests, "t")
    assert [c.expected for c in cases] == [2, -1, (1, [2.5], {"a": None}), NO_CONSTANT, NO_CONSTANT, NO_CONSTANT,
                                           NO_CONSTANT, set()]


def test_builtins_the_program_redefines_are_the_program_s() -> None:
    names = top_level_names("def pow(a, b):\n    max = 1\nimport os.path as p\nfor k in range(2):\n    q = 1\n"
                            "class A:\n    z = 1\n[w for w in ()]")
    assert names == {"pow", "p", "k", "q", "A"}
    (mine,), _ = parse_asserts("assert pow(2, 3) == 8", "t", names)
    (builtin,), _ = parse_asserts("assert pow(2, 3) == 8", "t")
    assert (mine.leaves, builtin.leaves) == (("pow(2, 3)",), ())
    assert top_level_names("def f(:") == frozenset()


def test_malformed_tests() -> None:
    with pytest.raises(DataError, match="where: line 3: an `assert` inside"):
        parse_asserts("x = 1\nif x:\n    assert f(x)", "where")
    with pytest.raises(DataError, match="no top-level `assert`"):
        parse_asserts("def check(c):\n    pass\ncheck(f)", "where")
    for bad in ([], [{"input": "1"}], [{"input": 1, "output": "2"}], "1 2", [{"input": "", "output": "", "x": ""}]):
        with pytest.raises(DataError, match="io: must be a non-empty list"):
            parse_io(bad, "io")
    assert parse_io([{"input": "1\n", "output": "2"}], "io")[0].output == "2"


def test_same_output() -> None:
    assert same_output("1 2  \n3\n\n\n", "1 2\n3")
    assert not same_output("1 2\n3", "1  2\n3") and not same_output(" 1", "1") and not same_output("1\n\n2", "1\n2")


# ----------------------------------------------------------------------------- encoding

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
    | st.complex_numbers(allow_nan=False) | st.fractions(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.frozensets(st.integers() | st.text(), max_size=3) | st.sets(st.integers(), max_size=3)
    | st.dictionaries(st.integers() | st.text() | st.tuples(st.integers()), inner, max_size=3),
    max_leaves=12)


def _typed(v: object) -> object:
    """`v` with every value's type next to it, so that 1 == 1.0 == True do not pass for each other."""
    if isinstance(v, (list, tuple)):
        return type(v).__name__, [_typed(x) for x in v]
    if isinstance(v, dict):
        return "dict", sorted((repr(_typed(k)), repr(_typed(x))) for k, x in v.items())
    if isinstance(v, (set, frozenset)):
        return type(v).__name__, sorted(repr(_typed(x)) for x in v)
    return type(v).__name__, v


@given(plain)
def test_encode_decode_round_trip(value: object) -> None:
    back = decode(json.loads(json.dumps(encode(value))))
    assert _typed(back) == _typed(value)


def test_encode_special_values() -> None:
    def trip(v: object) -> object:
        return decode(json.loads(json.dumps(encode(v))))

    assert math.isnan(trip(float("nan"))) and trip(float("-inf")) == float("-inf")
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # as the harness does: big integers are plain data too
    try:
        assert trip(10**5000) == 10**5000
    finally:
        sys.set_int_max_str_digits(limit)
    assert trip(range(1, 9, 2)) == range(1, 9, 2)
    assert trip(Decimal("1.10")) == Decimal("1.10") and str(trip(Decimal("1.10"))) == "1.10"
    assert trip(deque([1, 2])) == deque([1, 2]) and list(trip(iter([3, 4]))) == [3, 4]
    assert list(trip(x * x for x in range(3))) == [0, 1, 4] and list(trip(map(str, [1]))) == ["1"]
    # subclasses become their base type: a Counter that is equal to a dict stays equal to it
    assert type(trip(Counter("aab"))) is dict and trip(Counter("aab")) == {"a": 2, "b": 1}
    assert type(trip(OrderedDict(a=1))) is dict and type(trip(True)) is bool
    for bad in (object(), print, type, Ellipsis):
        with pytest.raises(TypeError, match="is not plain data"):
            encode(bad)


@pytest.mark.parametrize("data", [{"x": 1}, {"tuple": [1], "set": [2]}, {"range": ["1"]}, {"complex": [1, 2, 3, 4]},
                                  {"fraction": [1.5, 2]}, {"decimal": 3}, {"bytes": "zz"}, {"dict": [[[1], 2]]}])
def test_decode_refuses_anything_but_plain_data(data: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode(data)
