"""Code-execution reward: run model-written Python against the sample's tests in the sandbox
(`guidedrl.sandbox`); 1.0 when every test case passes, or the share passed with `partial=True`.

Tests per sample (docs/security.md): `sample.extra["tests"]`, assert statements (a string or a
list of strings), and/or `sample.extra["io_tests"]`, a list of {"input": str, "output": str}
run on stdin/stdout. The verdict is decided outside the program's process (`sandbox/run.py`).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable

from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample
from guidedrl.sandbox.cases import AssertCase, TestSet, parse_asserts, parse_io, top_level_names
from guidedrl.sandbox.jail import Limits, SandboxError, isolation_mode
from guidedrl.sandbox.run import run_batch


def extract_code(text: str) -> str:
    """The last ```python fenced block of a completion, else the last plain ``` block, else the text.

    >>> extract_code("Idea.\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("x = 1")
    'x = 1'
    """
    blocks = re.findall(r"```(?:python|py|python3)[ \t]*\n(.*?)```", text, flags=re.DOTALL | re.IGNORECASE)
    if not blocks:
        blocks = re.findall(r"```[ \t]*\n(.*?)```", text, flags=re.DOTALL)
    return blocks[-1] if blocks else text


def tests_of(sample: Sample, code: str, tests_field: str = "tests", io_field: str = "io_tests") -> TestSet | None:
    """The sample's test cases for `code`; None if it has none (the reward does not apply).
    DataError naming the sample and field if they are malformed."""
    tests, io = sample.extra.get(tests_field), sample.extra.get(io_field)
    if tests is None and io is None:
        return None
    asserts: tuple[AssertCase, ...] = ()
    setup: tuple[str, ...] = ()
    if tests is not None:
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)
        if not isinstance(tests, str):
            raise DataError(f"sample `{sample.id}`: `{tests_field}` must be a string of asserts or a list of them, "
                            f"got {type(tests).__name__}")
        asserts, setup = parse_asserts(tests, f"sample `{sample.id}`: `{tests_field}`", top_level_names(code))
    cases = parse_io(io, f"sample `{sample.id}`: `{io_field}`") if io is not None else ()
    return TestSet(asserts=asserts, judge_setup=setup, io=cases)


def code_reward(
    samples: list[Sample],
    completions: list[str],
    *,
    tests_field: str = "tests",
    io_field: str = "io_tests",
    partial: bool = False,
    workers: int | None = None,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_mb: int = 16,
    nproc: int = 16,
    disk_mb: int = 64,
    isolation: str = "auto",
) -> tuple[list[float | None], list[dict[str, Any]]]:
    """Score each completion by running its code against the sample's tests in the sandbox.

    The code is `extract_code(completion)`. Samples without tests score None (not applicable).
    Every test case of every sample runs in its own jail, `workers` at a time (default: the CPU
    count, at most 8); the limits are per case (`guidedrl.sandbox.jail.Limits`). Score: 1.0 if
    every case passes, else 0.0; with `partial`, the share of cases passed. Infos: `code/reason`,
    `code/detail`, `code/passed`, `code/total`, `code/seconds`, `code/isolation` (the weaker
    fallback says so here).
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, file_mb=file_mb, nproc=nproc,
                    disk_mb=disk_mb)
    codes = [extract_code(text) for text in completions]
    tests = [tests_of(s, c, tests_field, io_field) for s, c in zip(samples, codes, strict=True)]
    todo = [i for i, t in enumerate(tests) if t is not None]
    results = run_batch([(codes[i], tests[i]) for i in todo], limits, isolation, workers,
                        where=[f"sample `{samples[i].id}`" for i in todo])
    by_index = dict(zip(todo, results))
    scores: list[float | None] = []
    infos: list[dict[str, Any]] = []
    for i in range(len(samples)):
        r = by_index.get(i)
        if r is None:
            scores.append(None)
            infos.append({"code/reason": "no_tests"})
            continue
        scores.append(r.score(partial))
        infos.append({"code/reason": r.reason, "code/detail": r.detail[:500], "code/passed": r.passed,
                      "code/total": r.total, "code/seconds": r.elapsed_s, "code/isolation": r.isolation})
    return scores, infos


RewardFn = Callable[[list[Sample], list[str]], tuple[list[float | None], list[dict[str, Any]]]]


def make_code_reward(**args: Any) -> RewardFn:
    """`code_reward` with `args` checked now (ConfigError naming the bad one) and bound; also
    checks, once per process, which isolation will run (warning if it is the weaker fallback)."""
    known = [p for p in inspect.signature(code_reward).parameters if p not in ("samples", "completions")]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"code reward: unknown argument(s) {unknown}; known: {known}")
    Limits(**{k: args[k] for k in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "nproc", "disk_mb") if k in args})
    try:
        isolation_mode(args.get("isolation", "auto"))
    except SandboxError as e:  # `isolation: bwrap` where bubblewrap cannot run: the setting cannot hold
        raise ConfigError(f"code reward: `isolation`: {e}") from None
    return functools.partial(code_reward, **args)
