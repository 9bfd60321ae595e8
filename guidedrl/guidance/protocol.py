"""The guidance protocol: what a guide may ask of the trainer, and how a step's asks are batched.

Guidance is written as *programs*: generator functions that yield one ask at a time (generate
completions for these plans, score these completions, give me the policy's log-probs of these
tokens, have this teacher write these texts) and receive its answer. The trainer runs the programs
of every group of a step in lockstep (`gather`), so one round's asks across all groups reach the
engine in one call: a guided step makes one engine call per escalation round, not one per group.

Guidance never holds the engine, the reward or the policy: it holds a `Renderer` (tokenization)
and its teachers, gets a `StepInfo`, and the trainer answers its asks through `Services`.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, Union

from guidedrl.core.types import Completion, Origin, Sample

T = TypeVar("T")


@dataclass
class Plan:
    """How to produce `n` members of a group: generation context, forced prefix and token routing."""

    gen_context: list[int]
    """The context the members are sampled in (may hold guidance text)."""
    n: int
    prefix: list[int] = field(default_factory=list)
    """Teacher-forced response tokens (kept in the completion with loss mask 0 and log-prob 0)."""
    train_context: list[int] | None = None
    """Train under this context instead (guidance stripped); None = the generation context."""
    origin: Origin = "policy"
    offpolicy: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def with_n(self, n: int) -> "Plan":
        return Plan(self.gen_context, n, list(self.prefix), self.train_context, self.origin, self.offpolicy,
                    dict(self.meta))


@dataclass(frozen=True)
class StepInfo:
    """Where training stands, for schedules and random choices (the rng is seeded per step, so a
    resumed run makes the same choices)."""

    step: int
    total_steps: int
    rng: random.Random


# ----------------------------------------------------------------------------- asks


@dataclass
class Generate:
    """Sample each (sample, group, plan): answered with plan.n scored completions per item."""

    items: list[tuple[Sample, int, Plan]]


@dataclass
class Score:
    """Score completions made by guidance (reward and reward_info filled in place); answered with them."""

    completions: list[Completion]


@dataclass
class LogProbs:
    """The current policy's log-prob of each response token given its context: answered with one
    list of floats per (context ids, response ids) pair."""

    pairs: list[tuple[list[int], list[int]]]


@dataclass
class TeacherText:
    """Have `teacher` write `n` continuations of `prefix` as its answer to each sample: answered with
    one list of n texts per (sample, prefix, n) request."""

    teacher: "Teacher"
    requests: list[tuple[Sample, str, int]]


Ask = Union[Generate, Score, LogProbs, TeacherText, "Asks"]


@dataclass
class Asks:
    """Several asks answered together (made by `gather`); answered with a list of their answers."""

    asks: list[Ask]


Program = Generator[Ask, Any, T]
"""A guidance program: yields asks, receives their answers, returns its result."""


class Teacher(Protocol):
    """A teacher (guide, helper) model that writes text: a local model or a remote endpoint."""

    def complete_batch(self, requests: list[tuple[Sample, str, int]], seed: int) -> list[list[str]]:
        """For each (sample, prefix, n): n continuations of `prefix` (the prefix excluded)."""
        ...


class Services(Protocol):
    """The narrow interface the trainer gives guidance. Each call answers one whole round."""

    def generate(self, items: list[tuple[Sample, int, Plan]], seed: int) -> list[list[Completion]]:
        """One engine call for every item; the completions come back scored."""
        ...

    def score(self, completions: list[Completion]) -> None:
        """One reward call; fills reward and reward_info in place."""
        ...

    def logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The current policy's log-probs of each response token (no gradient)."""
        ...


class Guide(Protocol):
    """Guidance hooks: `plan` shapes contexts before sampling; `revise` acts on scored groups."""

    def plan(self, samples: list[Sample], info: StepInfo) -> Program[list[list[Plan] | None]]:
        """For each sample, its group's plans, or None for G plain on-policy samples."""
        ...

    def revise(self, groups: list[list[Completion]], info: StepInfo) -> Program[list[list[Completion]]]:
        """The groups to train on (may re-sample, inject or replace members, split or add groups)."""
        ...

    def metrics(self) -> dict[str, float]:
        """`guide/...` metrics since the last call."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- running programs


def done(value: T) -> Program[T]:
    """A program that asks nothing and returns `value`."""
    return value
    yield  # noqa: unreachable: makes this a generator


def gather(programs: list[Program[Any]]) -> Program[list[Any]]:
    """Run programs in lockstep: each round yields one `Asks` of every unfinished program's ask,
    so the trainer answers a round of all of them at once. -> their results, in order."""
    results: list[Any] = [None] * len(programs)
    pending: dict[int, Ask] = {}
    for i, p in enumerate(programs):
        try:
            pending[i] = next(p)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = list(pending)
        answers = yield Asks([pending[i] for i in order])
        pending = {}
        for i, answer in zip(order, answers, strict=True):
            try:
                pending[i] = programs[i].send(answer)
            except StopIteration as stop:
                results[i] = stop.value
    return results


def execute(program: Program[T], services: Services, rng: random.Random) -> T:
    """Run a program to its end, answering each round of asks with one call per kind of ask
    (one engine call for all its Generate asks; seeds drawn from `rng`)."""
    try:
        ask = next(program)
        while True:
            ask = program.send(answer_round(ask, services, rng))
    except StopIteration as stop:
        return stop.value


def _leaves(ask: Ask) -> list[Ask]:
    return [leaf for a in ask.asks for leaf in _leaves(a)] if isinstance(ask, Asks) else [ask]


def _rebuild(ask: Ask, answers: list[Any]) -> Any:
    """Answers of the leaves (consumed from the front of `answers`) in the nesting of `ask`."""
    if isinstance(ask, Asks):
        return [_rebuild(a, answers) for a in ask.asks]
    return answers.pop(0)


def answer_round(ask: Ask, services: Services, rng: random.Random) -> Any:
    """Answer one (possibly nested) round: every leaf of a kind goes in one call."""
    leaves = _leaves(ask)
    answers: dict[int, Any] = {}
    gens = [i for i, a in enumerate(leaves) if isinstance(a, Generate)]
    if gens:
        items = [it for i in gens for it in leaves[i].items]  # type: ignore[union-attr]
        out = iter(services.generate(items, seed=rng.randrange(2**31)))
        for i in gens:
            answers[i] = [next(out) for _ in leaves[i].items]  # type: ignore[union-attr]
    scores = [i for i, a in enumerate(leaves) if isinstance(a, Score)]
    if scores:
        services.score([c for i in scores for c in leaves[i].completions])  # type: ignore[union-attr]
        answers |= {i: leaves[i].completions for i in scores}  # type: ignore[union-attr]
    lps = [i for i, a in enumerate(leaves) if isinstance(a, LogProbs)]
    if lps:
        out_lp = iter(services.logprobs([p for i in lps for p in leaves[i].pairs]))  # type: ignore[union-attr]
        for i in lps:
            answers[i] = [next(out_lp) for _ in leaves[i].pairs]  # type: ignore[union-attr]
    teachers: dict[int, list[int]] = {}
    for i, a in enumerate(leaves):
        if isinstance(a, TeacherText):
            teachers.setdefault(id(a.teacher), []).append(i)
    for idx in teachers.values():
        teacher = leaves[idx[0]].teacher  # type: ignore[union-attr]
        texts = iter(teacher.complete_batch([r for i in idx for r in leaves[i].requests], seed=rng.randrange(2**31)))  # type: ignore[union-attr]
        for i in idx:
            answers[i] = [next(texts) for _ in leaves[i].requests]  # type: ignore[union-attr]
    return _rebuild(ask, [answers[i] for i in range(len(leaves))])
