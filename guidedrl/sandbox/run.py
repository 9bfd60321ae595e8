"""Run model-written Python against its tests; the verdict is decided outside the program's process.

Each test case runs in a fresh jail (`jail.py`): the program, then the parts of the case that need
it (its *leaves*, `cases.py`), whose values come back as plain data. `leaf == constant` is
compared here, on the decoded value; any other assertion goes to a second jail that runs only the
tests' own code (the *judge*, one per program); stdin/stdout cases are compared here. The program
never sees what its values are compared with, and nothing it writes is taken as a verdict:
forging a pass means producing the right values, which is solving the case. Cases run in
parallel, `workers` jails at a time.

Reasons: ok, test_failed, timeout, cpu_limit, memory_limit, file_size_limit, process_limit,
network, killed, syntax_error, error. `ok`, `test_failed` and `timeout` are the parent's own
findings; the others are a diagnosis from the exit status and the program's own error report,
which it could fake (that changes the label of a failure, never a score). Score: 1.0 when every
case passes, else 0.0; with `partial`, the share of cases passed.

    python -m guidedrl.sandbox --selftest   # the hostile suite, as a table (docs/security.md)
"""

from __future__ import annotations

import errno
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guidedrl.core.errors import DataError
from guidedrl.sandbox.cases import (LEAF, NO_CONSTANT, AssertCase, TestSet, parse_asserts, parse_io, same_output,
                                    top_level_names)
from guidedrl.sandbox.harness import decode
from guidedrl.sandbox.jail import BOX, Exit, Limits, isolation_mode, run_jailed, sandbox_python

REASONS = ("ok", "test_failed", "timeout", "cpu_limit", "memory_limit", "file_size_limit", "process_limit",
           "network", "killed", "syntax_error", "error")
HARNESS = (Path(__file__).with_name("harness.py")).read_bytes()
NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.ECONNREFUSED}


@dataclass
class CaseResult:
    """One test case."""

    passed: bool
    reason: str
    detail: str = ""


@dataclass
class RunResult:
    """What happened to one program and its tests."""

    ok: bool
    """Every case passed (without tests: the program ran to its end)."""
    reason: str
    """One of REASONS: "ok", else the first failed case's."""
    detail: str
    passed: int
    total: int
    stdout: str
    """Of the first failed case's program (of the first case if none failed), truncated."""
    stderr: str
    returncode: int | None
    elapsed_s: float
    """The longest of the program's processes, start of the jail to its end."""
    isolation: str
    cases: list[CaseResult] = field(default_factory=list)

    def score(self, partial: bool = False) -> float:
        """1.0 if every case passed; with `partial`, the share passed; else 0.0."""
        if self.ok:
            return 1.0
        return self.passed / self.total if partial and self.total else 0.0


# ----------------------------------------------------------------------------- reading a process


def _records(data: bytes) -> list[dict[str, Any]]:
    """The JSON-object lines of a report; anything else (a program's garbage) is skipped."""
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _text(value: Any, limit: int = 500) -> str:
    return str(value)[:limit]


def _ended(ex: Exit, limits: Limits) -> tuple[str, str] | None:
    """(reason, detail) if the process did not end normally; the reports are not read."""
    if ex.timed_out:
        return "timeout", f"still running after {limits.timeout_s} s"
    sig = ex.code - 128 if ex.code is not None and ex.code > 128 else None
    if sig == signal.SIGXCPU:
        return "cpu_limit", f"used {limits.cpu_s} s of CPU"
    if sig == signal.SIGXFSZ:
        return "file_size_limit", f"wrote a file larger than {limits.file_mb} MB"
    if sig is not None and sig < signal.NSIG:
        return "killed", f"killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() else f"signal {sig}"
    return None


def _classify(err: dict[str, Any]) -> str:
    """The reason the program's own error report stands for (a diagnosis, see the module docstring)."""
    name, code, detail = err.get("error"), err.get("errno"), _text(err.get("detail"))
    if err.get("phase") == "compile" and name in ("SyntaxError", "IndentationError", "TabError", "ValueError"):
        return "syntax_error"
    if name == "MemoryError":
        return "memory_limit"
    if name == "BlockingIOError" and code == errno.EAGAIN or "can't start new thread" in detail:
        return "process_limit"
    if code in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
        return "file_size_limit"
    if name in ("gaierror", "herror") or code in NETWORK_ERRNOS:
        return "network"
    return "error"


def _program_values(ex: Exit, n_leaves: int, limits: Limits) -> tuple[list[str] | None, str, str]:
    """(the leaves' encoded values, or None with reason and detail) from a program's process."""
    ended = _ended(ex, limits)
    if ended is not None:
        return None, *ended
    records = _records(ex.report)
    err = next((r for r in records if "error" in r), None)
    if err is not None:
        return None, _classify(err), f"{_text(err.get('phase'))}: {_text(err.get('detail'))}"
    leaves: dict[int, dict[str, Any]] = {}
    for r in records:
        if type(r.get("leaf")) is int and 0 <= r["leaf"] < n_leaves:
            leaves.setdefault(r["leaf"], r)
    if ex.code != 0 or not any(r.get("done") is True for r in records) or len(leaves) < n_leaves:
        return None, "error", f"the program ended (exit code {ex.code}) before the tests ran"
    values = []
    for i in range(n_leaves):
        r = leaves[i]
        if "raised" in r:
            return None, "test_failed", f"raised {_text(r['raised'])}"
        if not isinstance(r.get("value"), str):
            return None, "test_failed", f"returned something that is not plain data ({_text(r.get('unencodable'))})"
        values.append(r["value"])
    return values, "", ""


# ----------------------------------------------------------------------------- jobs


def _program_job(code: str, leaves: tuple[str, ...] = (), setup: tuple[str, ...] = ()) -> dict[str, bytes]:
    job = {"mode": "program", "code": code, "leaves": list(leaves), "setup": list(setup)}
    return {"harness.py": HARNESS, "job.json": json.dumps(job).encode()}


def _jail(files: dict[str, bytes], stdin: str, limits: Limits, mode: str) -> Exit:
    argv = [sandbox_python().exe, "-I", "-S", "-B", f"{BOX}/harness.py", f"{BOX}/job.json", "{report}"]
    return run_jailed(argv, files, stdin.encode(), limits, mode)


def run_batch(items: list[tuple[str, TestSet | None]], limits: Limits | None = None, isolation: str = "auto",
              workers: int | None = None, where: list[str] | None = None) -> list[RunResult]:
    """Run each (program, tests) in the sandbox: every case of every item in parallel, then the
    judges. `tests` None runs the program once (ok if it ends normally). `where` names the items
    in a DataError (tests whose own setup fails in the sandbox)."""
    limits = limits or Limits()
    mode = isolation_mode(isolation)
    runs: list[tuple[int, int, dict[str, bytes], str]] = []  # (item, case or -1, files, stdin)
    for i, (code, tests) in enumerate(items):
        if tests is None:
            runs.append((i, -1, _program_job(code), ""))
            continue
        runs += [(i, k, _program_job(code, c.leaves, c.setup), "") for k, c in enumerate(tests.asserts)]
        runs += [(i, len(tests.asserts) + k, _program_job(code), c.input) for k, c in enumerate(tests.io)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        exits = list(pool.map(lambda r: _jail(r[2], r[3], limits, mode), runs))
        by_item: dict[int, dict[int, Exit]] = {}
        for (i, k, _, _), ex in zip(runs, exits):
            by_item.setdefault(i, {})[k] = ex
        outcomes = {i: _cases(tests, by_item[i], limits) for i, (_, tests) in enumerate(items) if tests is not None}
        judged = [(i, items[i][1], pending) for i, (_, pending) in outcomes.items() if pending]
        verdicts = list(pool.map(lambda j: _judge(j[1], j[2], limits, mode), judged))
    for (i, tests, _), verdict in zip(judged, verdicts):
        if isinstance(verdict, str):
            name = where[i] if where else f"item {i}"
            raise DataError(f"{name}: the tests' own setup failed in the sandbox: {verdict}")
        outcomes[i][0].update(verdict)
    return [_result(by_item[i], outcomes[i][0] if tests is not None else None, tests, limits, mode)
            for i, (_, tests) in enumerate(items)]


def _cases(tests: TestSet, exits: dict[int, Exit], limits: Limits
           ) -> tuple[dict[int, CaseResult], dict[int, list[str]]]:
    """(decided cases, assert cases waiting for the judge with their leaves' values)."""
    done: dict[int, CaseResult] = {}
    pending: dict[int, list[str]] = {}
    for k, case in enumerate(tests.asserts):
        values, reason, detail = _program_values(exits[k], len(case.leaves), limits)
        same = None if values is None else _equals_constant(case, values)
        if values is None:
            done[k] = CaseResult(False, reason, detail)
        elif same is not None:
            done[k] = CaseResult(True, "ok") if same else CaseResult(False, "test_failed", "the assertion is false")
        else:
            pending[k] = values
    for k, case in enumerate(tests.io, start=len(tests.asserts)):
        _, reason, detail = _program_values(exits[k], 0, limits)
        if reason:
            done[k] = CaseResult(False, reason, detail)
        elif same_output(exits[k].stdout.decode(errors="replace"), case.output):
            done[k] = CaseResult(True, "ok")
        else:
            done[k] = CaseResult(False, "test_failed", "wrong output")
    return done, pending


def _equals_constant(case: AssertCase, values: list[str]) -> bool | None:
    """`leaf == constant` decided here: the value decoded into plain built-in values (never the
    program's objects) compared with the constant from the tests; None if the judge must decide
    (another form, or a value this process will not decode, e.g. an integer over 4300 digits)."""
    if case.expected is NO_CONSTANT:
        return None
    try:
        return bool(decode(json.loads(values[0])) == case.expected)
    except (ValueError, TypeError, RecursionError, MemoryError):
        return None


def _judge(tests: TestSet, pending: dict[int, list[str]], limits: Limits, mode: str) -> dict[int, CaseResult] | str:
    """The judge's verdict on each pending case; a string if the tests' own setup failed."""
    order = sorted(pending)
    cases = [{"expr": tests.asserts[k].expr, "values": {f"{LEAF}{j}": v for j, v in enumerate(pending[k])}}
             for k in order]
    job = {"mode": "judge", "setup": list(tests.judge_setup), "cases": cases}
    ex = _jail({"harness.py": HARNESS, "job.json": json.dumps(job).encode()}, "", limits, mode)
    records = _records(ex.report)
    setup_error = next((r["setup_error"] for r in records if "setup_error" in r), None)
    if setup_error is not None:
        return _text(setup_error)
    said = {r["case"]: r for r in records if type(r.get("case")) is int and type(r.get("ok")) is bool}
    why = _ended(ex, limits)
    out = {}
    for j, k in enumerate(order):
        r = said.get(j)
        if r is None:
            out[k] = CaseResult(False, "test_failed", "the tests could not be evaluated on the program's values"
                                + (f" ({why[1]})" if why else ""))
        elif r["ok"]:
            out[k] = CaseResult(True, "ok")
        else:
            out[k] = CaseResult(False, "test_failed", "the assertion is false" + (
                f" ({_text(r['error'])})" if r.get("error") else ""))
    return out


def _result(exits: dict[int, Exit], cases: dict[int, CaseResult] | None, tests: TestSet | None, limits: Limits,
            mode: str, max_output: int = 65536) -> RunResult:
    """Put one item's processes and case verdicts together."""
    if cases is None:  # the program alone
        _, reason, detail = _program_values(exits[-1], 0, limits)
        cases, first = {-1: CaseResult(not reason, reason or "ok", detail)}, -1
    order = sorted(cases)
    failed = [k for k in order if not cases[k].passed]
    first = failed[0] if failed else order[0]
    ex, case = exits[first], cases[first]
    passed = sum(c.passed for c in cases.values())
    total = tests.cases if tests is not None else 0
    detail = case.detail
    if failed and tests is not None:
        n = len(tests.asserts)
        name = tests.asserts[first].source if first < n else f"stdin/stdout case {first - n + 1}"
        detail = f"case {first + 1} of {total} ({name}): {detail}"
    return RunResult(ok=not failed, reason=case.reason, detail=detail, passed=passed, total=total,
                     stdout=_head(ex.stdout, max_output), stderr=_head(ex.stderr, max_output),
                     returncode=ex.code, elapsed_s=max(e.seconds for e in exits.values()), isolation=mode,
                     cases=[cases[k] for k in order])


def _head(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def run_program(code: str, tests: str | list[str] | None = None, *, io: list[dict[str, str]] | None = None,
                isolation: str = "auto", workers: int | None = None, **limits: Any) -> RunResult:
    """Run one program: against assert `tests` and/or stdin/stdout cases `io`, or alone.
    `limits` are `Limits` fields. Never raises for anything the program does."""
    tests_set = None
    if tests is not None or io is not None:
        text = "\n".join(tests) if isinstance(tests, list) else tests
        asserts, setup = parse_asserts(text, "tests", top_level_names(code)) if text is not None else ((), ())
        tests_set = TestSet(asserts=asserts, judge_setup=setup, io=parse_io(io, "io") if io is not None else ())
    return run_batch([(code, tests_set)], Limits(**limits), isolation, workers)[0]


__all__ = ["AssertCase", "CaseResult", "Limits", "REASONS", "RunResult", "TestSet", "run_batch", "run_program"]
