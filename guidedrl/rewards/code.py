"""Code-execution reward: run model-written Python against the sample's tests in the sandbox
(`guidedrl.sandbox`); 1.0 when every test passes, or the share passed with `partial=True`."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample
from guidedrl.sandbox.exec import Isolation, Limits, isolation_mode, run_program


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


def _tests_of(sample: Sample, field: str) -> str | None:
    """The sample's tests as one source string; None if it has none (the reward does not apply)."""
    tests = sample.extra.get(field)
    if tests is None:
        return None
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        return "\n".join(tests)
    if not isinstance(tests, str):
        raise DataError(f"sample `{sample.id}`: `{field}` must be a string of asserts or a list of them, "
                        f"got {type(tests).__name__}")
    return tests


def code_reward(
    samples: list[Sample],
    completions: list[str],
    *,
    tests_field: str = "tests",
    partial: bool = False,
    workers: int | None = None,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_mb: int = 16,
    nproc: int = 32,
    disk_mb: int = 64,
    isolation: Isolation = "auto",
    audit: bool = True,
) -> tuple[list[float | None], list[dict[str, Any]]]:
    """Score each completion by running its code against `sample.extra[tests_field]` in the sandbox.

    The code is `extract_code(completion)`; the tests are a string (or list) of asserts. Samples
    without tests score None (not applicable). Programs run in parallel, `workers` at a time
    (default: the CPU count, at most 8); each thread only waits on its subprocess. The limits are
    `run_program`'s. Score: `RunResult.score(partial)`. Infos carry `code/reason`, `code/detail`,
    `code/passed`, `code/total`, `code/seconds`.
    """
    limits = {"timeout_s": timeout_s, "cpu_s": cpu_s, "memory_mb": memory_mb, "file_mb": file_mb, "nproc": nproc,
              "disk_mb": disk_mb, "isolation": isolation, "audit": audit, "partial": partial}
    jobs = [(extract_code(text), _tests_of(s, tests_field)) for s, text in zip(samples, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        futures = [None if tests is None else pool.submit(run_program, code, tests, **limits) for code, tests in jobs]
        results = [None if f is None else f.result() for f in futures]
    scores: list[float | None] = []
    infos: list[dict[str, Any]] = []
    for r in results:
        if r is None:
            scores.append(None)
            infos.append({"code/reason": "no_tests"})
            continue
        scores.append(r.score(partial))
        infos.append({"code/reason": r.reason, "code/detail": r.detail[:500], "code/passed": r.passed,
                      "code/total": r.total, "code/seconds": r.elapsed_s})
    return scores, infos


def make_code_reward(**args: Any) -> Callable[[list[Sample], list[str]], tuple[list[float | None], list[dict[str, Any]]]]:
    """`code_reward` with `args` checked now (ConfigError naming the bad one) and bound."""
    import functools
    import inspect

    known = [p for p in inspect.signature(code_reward).parameters if p not in ("samples", "completions")]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"code reward: unknown argument(s) {unknown}; known: {known}")
    Limits(**{k: args[k] for k in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "nproc", "disk_mb") if k in args})
    isolation_mode(args.get("isolation", "auto"))
    return functools.partial(code_reward, **args)
