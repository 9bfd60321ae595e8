"""`arith`: the embedded procedural task family (chains of small-integer operations).

A problem defines a start variable and a chain of variables, each one operation away from another;
the answer is the value of the last one, which is always called `z`. The definitions after the start
are listed in random order, so the chain has to be followed by name (a skill that carries over to
longer chains) rather than by position in the prompt (which does not):

    prompt     "k=7. z=x-3. p=k+5. x=p*2. z=?\n"
    reference  "p=7+5=12 x=12*2=24 z=24-3=21 #### 21"
    hints      ["Hint: p=7+5=12\n", "Hint: p=7+5=12\n"]        (level 3: first step; first half)

Level `l` needs exactly `l` steps, so higher levels need longer reasoning, not bigger numbers: every
value stays in 0..MAX_VALUE and every step is one operation on two small numbers (+d, -d with d in
1..9, *2, *3), so each single step is learnable by a tiny model and difficulty comes from chaining.
`Sample.prompt` is the full raw prompt for a base model (no chat template), ending where the answer
starts; `Sample.reference` is the exact text the model should write, so `prompt + reference[:k]` is
a valid response prefix. Hints (weakest first: the first step, then the first half of the steps)
end in a newline, since guidance appends them to the prompt as `prompt + "\n" + hint`.

Splits never overlap: a problem's split is a function of the problem itself (a hash of its prompt
text), and each split keeps drawing from its own seeded stream until it has enough distinct problems
of its own split. The same (split, size, levels, seed) always gives the same list.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample

LEVELS: int = 7
"""The number of difficulty levels; level l needs l operations."""
MAX_VALUE = 29
"""Every start and intermediate value lies in 0..MAX_VALUE."""
TEST_SHARE = 5
"""One problem in TEST_SHARE (by hash) belongs to the test split, the rest to train."""
ANSWER_MARKER = "####"

_ANSWER_RE = re.compile(r"####\s*(-?\d+)")
NAMES = "abcdefghijkmnpqrstuvwxyz"
"""Variable names (no l or o, which look like digits)."""
SHUFFLE = True
"""List the definitions after the start in random order, so the chain must be followed by name."""
QUERY_NAME: str | None = "z"
"""The asked-for variable always has this name (None: a random one). A solver then stops after
the step that defines it, a rule that holds at any chain length, where a random name lets a small
model learn "stop after as many steps as the easy levels have" instead."""
TAIL = 0
"""Up to TAIL more definitions continue the chain past the queried variable, so the number of
definitions does not give the number of steps: a solver has to stop when it reaches the query."""


@dataclass(frozen=True)
class Op:
    """One operation: `sym` in '+', '-', '*' applied with `arg`."""

    sym: str
    arg: int

    def apply(self, x: int) -> int:
        """The value after applying this operation to `x`."""
        return x + self.arg if self.sym == "+" else x - self.arg if self.sym == "-" else x * self.arg


@dataclass(frozen=True)
class Problem:
    """A start value, the operations in order, the variable names (start first) and the order
    in which the definitions after the start are listed in the prompt."""

    start: int
    ops: tuple[Op, ...]
    names: tuple[str, ...]
    order: tuple[int, ...]
    tail: tuple[Op, ...] = ()
    """Operations past the query (listed in the prompt, not part of the answer); names has one
    more entry per tail operation, and `order` indexes chain and tail operations together."""

    def values(self) -> list[int]:
        out = [self.start]
        for op in self.ops:
            out.append(op.apply(out[-1]))
        return out

    def prompt(self) -> str:
        n, ops = self.names, self.ops + self.tail
        defs = [f"{n[i + 1]}={n[i]}{ops[i].sym}{ops[i].arg}." for i in self.order]
        return " ".join([f"{n[0]}={self.start}."] + defs + [f"{n[len(self.ops)]}=?"]) + "\n"

    def steps(self) -> list[str]:
        """The worked steps in order, e.g. ['p=7+5=12', 'x=12*2=24']."""
        v, n = self.values(), self.names
        return [f"{n[i + 1]}={v[i]}{op.sym}{op.arg}={v[i + 1]}" for i, op in enumerate(self.ops)]


def _valid_ops(x: int) -> list[list[Op]]:
    """The operations that keep `x` in 0..MAX_VALUE, grouped by kind (so kinds are equally likely)."""
    add = [Op("+", d) for d in range(1, 10) if x + d <= MAX_VALUE]
    sub = [Op("-", d) for d in range(1, 10) if x - d >= 0]
    mul = [Op("*", m) for m in (2, 3) if x * m <= MAX_VALUE]
    return [kind for kind in (add, sub, mul) if kind]


def _random_problem(rng: random.Random, level: int) -> Problem:
    x = start = rng.randint(0, MAX_VALUE)
    ops = []
    n_tail = rng.randint(0, min(TAIL, len(NAMES) - level - 2)) if TAIL else 0
    for _ in range(level + n_tail):
        op = rng.choice(rng.choice(_valid_ops(x)))
        ops.append(op)
        x = op.apply(x)
    order = list(range(level + n_tail))
    if SHUFFLE:
        rng.shuffle(order)
    pool = NAMES.replace(QUERY_NAME, "") if QUERY_NAME else NAMES
    names = list(rng.sample(pool, level + n_tail + 1))
    if QUERY_NAME:
        names[level] = QUERY_NAME
    return Problem(start, tuple(ops[:level]), tuple(names), tuple(order), tuple(ops[level:]))


def _split_of(problem: Problem) -> str:
    """`test` for one problem in TEST_SHARE, chosen by a stable hash of its text (not of the seed)."""
    digest = int(hashlib.sha256(problem.prompt().encode()).hexdigest()[:8], 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def make_sample(problem: Problem, split: str, index: int) -> Sample:
    """The Sample for one problem (prompt, answer, reference, hints, level)."""
    steps = problem.steps()
    answer = str(problem.values()[-1])
    half = max(1, len(steps) // 2)
    return Sample(
        id=f"arith-{split}-L{len(steps)}-{index}",
        prompt=problem.prompt(),
        answer=answer,
        reference=" ".join(steps + [f"{ANSWER_MARKER} {answer}"]),
        hints=[f"Hint: {steps[0]}\n", "Hint: " + " ".join(steps[:half]) + "\n"],
        level=len(steps),
        extra={"steps": len(steps)},
    )


def _check_args(split: str, size: int, levels: list[int]) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"arith task: `split` must be `train` or `test`, got {split!r}")
    if size < 0:
        raise ConfigError(f"arith task: `size` must be >= 0, got {size}")
    bad = [lv for lv in levels if not (isinstance(lv, int) and 1 <= lv <= LEVELS)]
    if bad or not levels:
        raise ConfigError(f"arith task: `levels` must be a non-empty list of ints in 1..{LEVELS}, got {levels}")


def distinct_problems(split: str, level: int, limit: int, seed: int = 0) -> list[Sample]:
    """Up to `limit` distinct problems of one split and level, from that split's seeded stream.

    Fewer come back only when the level's problem space of that split runs out (the stream then
    finds nothing new for a long run of draws); with the default settings every level has far more problems than any run asks for.
    """
    _check_args(split, limit, [level])
    rng = random.Random(f"arith|{split}|{level}|{seed}")  # one stream per (split, level, seed)
    seen: set[str] = set()
    out: list[Sample] = []
    fruitless = 0
    while len(out) < limit and fruitless < 20_000:
        problem = _random_problem(rng, level)
        if _split_of(problem) != split or problem.prompt() in seen:
            fruitless += 1
            continue
        fruitless = 0
        seen.add(problem.prompt())
        out.append(make_sample(problem, split, len(out)))
    return out


def make_samples(split: str = "train", size: int = 512, levels: list[int] | None = None, seed: int = 0) -> list[Sample]:
    """`size` distinct problems of `split`, spread evenly over `levels` (None = all), in level order.

    Deterministic in (split, size, levels, seed). A level whose problem space runs short raises
    ConfigError rather than repeating problems (only tiny settings of NAMES / MAX_VALUE make that happen).

    >>> s = make_samples("test", size=2, levels=[3], seed=1)[0]
    >>> arith_reward([s], [s.reference])
    [1.0]
    """
    levels = list(range(1, LEVELS + 1)) if levels is None else list(levels)
    _check_args(split, size, levels)
    out: list[Sample] = []
    for i, level in enumerate(levels):
        want = size // len(levels) + (1 if i < size % len(levels) else 0)
        got = distinct_problems(split, level, want, seed)
        if len(got) < want:
            raise ConfigError(
                f"arith task: level {level} has only {len(got)} distinct {split} problems, {want} asked (`size` {size})"
            )
        out.extend(got)
    return out


def extract_answer(text: str) -> str | None:
    """The integer after the first `####` marker, or None.

    >>> extract_answer("7+5=12. #### 12")
    '12'
    >>> extract_answer("#### 012 more"), extract_answer("####-3")
    ('12', '-3')
    >>> extract_answer("7+5=12.") is None, extract_answer("#### x") is None
    (True, True)
    """
    m = _ANSWER_RE.search(text)
    return None if m is None else str(int(m.group(1)))


def arith_reward(samples: list[Sample], completions: list[str]) -> list[float]:
    """1.0 when the completion's extracted answer equals the sample's answer, else 0.0.

    >>> s = Sample(id="x", prompt="Start at 7. Add 5.\\n", answer="12")
    >>> arith_reward([s, s, s], ["7+5=12. #### 12", "7+5=13. #### 13", "7+5=12."])
    [1.0, 0.0, 0.0]
    """
    if len(samples) != len(completions):
        raise ValueError(f"arith_reward: {len(samples)} samples but {len(completions)} completions")
    out = []
    for s, text in zip(samples, completions, strict=True):
        got = extract_answer(text)
        out.append(1.0 if got is not None and s.answer is not None and got == str(int(s.answer)) else 0.0)
    return out
