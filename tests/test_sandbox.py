"""The code sandbox against hostile programs: the whole suite in the default isolation (each attack
gets its reason, scores nothing it did not earn and gets nothing out), then the pieces that make a
verdict unforgeable, the legitimate uses, the reward and the fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample
from guidedrl.rewards.code import code_reward, extract_code, make_code_reward
from guidedrl.sandbox import jail
from guidedrl.sandbox.jail import ISOLATION_BWRAP, ISOLATION_WEAK, Limits, SandboxError, isolation_mode
from guidedrl.sandbox.run import run_program
from guidedrl.sandbox.suite import DETACH, FORGE_TESTS, HOSTILE, WRONG, Hostile, leftover_processes, run_suite

SLACK_S = 60.0  # wall clock for tests not about time: a busy machine must not turn a pass into a timeout


def test_default_isolation_is_bubblewrap() -> None:
    """CI runs the suite below against the default isolation, which must be the jail: where
    bubblewrap cannot run, scripts/setup.sh installs it (or says why it cannot)."""
    assert isolation_mode("auto") == ISOLATION_BWRAP, jail._probe()


@pytest.fixture(scope="module")
def suite() -> dict:
    out = run_suite("auto", workers=4)
    assert leftover_processes() == []  # nothing any program started outlived its run
    assert subprocess.run(["true"]).returncode == 0  # this process can still start processes
    return out


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile(case: Hostile, suite: dict) -> None:
    r, got_out = suite[case.name]
    assert (r.reason, got_out) == (case.expect, []), (r.detail, r.stdout[-500:], r.stderr[-800:])
    assert r.isolation == ISOLATION_BWRAP


# ----------------------------------------------------------------------------- what decides a pass


def test_program_never_sees_the_expected_value() -> None:
    """The program's process gets the leaves and the setup they need, not the comparison."""
    from guidedrl.sandbox.cases import parse_asserts

    tests = "import math\nexpected = 987654\nx = 3\nassert f(x) == expected\nassert abs(g(2) - 123.5) < 0.01"
    cases, judge_setup = parse_asserts(tests, "t")
    seen = [" ".join(c.leaves + c.setup) for c in cases]
    assert seen == ["f(x) x = 3", "g(2)"]
    assert not any("987654" in s or "123.5" in s for s in seen)
    assert judge_setup == ("import math", "expected = 987654", "x = 3")


@pytest.mark.parametrize("tests", ["assert add(2, 3) == 5", "assert abs(add(2, 3) - 5) < 0.5"],
                         ids=["compared by the parent", "compared by the judge"])
def test_forged_values_are_judged_as_values(tests: str) -> None:
    """Whatever the program claims for `add(2, 3)`, 5 is compared with it outside its process: a
    value that is not 5 fails, whether returned or written as a fake report."""
    forge = ("import os\nfd = int(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[-2])  # the harness's report fd\n"
             "os.write(fd, b'{\"leaf\": 0, \"value\": \"6\"}\\n{\"done\": true}\\n')\nos._exit(0)")
    for code in ("def add(a, b):\n    return 6", forge, WRONG + "import builtins\nbuiltins.eval = lambda *a, **k: 6"):
        r = run_program(code, tests, timeout_s=SLACK_S)
        assert (r.reason, r.passed, r.score(partial=True)) == ("test_failed", 0, 0.0), (code, r.detail, r.stderr)
        assert r.cases[0].detail == "the assertion is false"  # the claimed 6 was compared with 5
    # claiming the right value is what returning it would do: the forged report is just a value
    r = run_program(forge.replace('"6"', '"5"'), tests, timeout_s=SLACK_S)
    assert r.ok


def test_partial_credit_counts_cases_each_in_its_own_process() -> None:
    # case 2 loops forever, case 3 crashes, case 4 is wrong: 1 of 4; the others are unaffected
    code = "def f(x):\n    if x == 2:\n        while True:\n            pass\n    if x == 3:\n        raise ValueError(x)\n    return x * 2"
    tests = ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6", "assert f(4) == 9"]
    r = run_program(code, tests, timeout_s=SLACK_S, cpu_s=1)
    assert [c.reason for c in r.cases] == ["ok", "cpu_limit", "test_failed", "test_failed"]
    assert "ValueError: 3" in r.cases[2].detail and r.cases[3].detail == "the assertion is false"
    assert (r.passed, r.total, r.reason) == (1, 4, "cpu_limit")
    assert r.score(partial=True) == 0.25 and r.score() == 0.0


def test_assert_forms() -> None:
    code = ("import math\ndef area(r):\n    return math.pi * r * r\ndef evens(n):\n    return (i for i in range(0, n, 2))\n"
            "class Solution:\n    def two(self, xs):\n        return (xs[1], xs[0])\ndef pow(a, b):\n    return 'mine'")
    tests = """
import math
from fractions import Fraction
pairs = [(1, 2)]
assert abs(area(2) - 12.566) < 0.01
assert math.isclose(area(1), 3.14159, rel_tol=1e-3)
assert list(evens(5)) == [0, 2, 4]
assert Solution().two([1, 2]) == (2, 1) and isinstance(Solution().two([1, 2]), tuple)
assert [area(r) > 3 for r in range(3)] == [False, True, True]
assert sorted(area(a) for a, _ in pairs) == [area(1)]
assert pow(2, 3) == 'mine'
assert Fraction(1, 3) != area(1)
"""
    r = run_program(code, tests, timeout_s=SLACK_S)
    assert (r.ok, r.passed, r.total) == (True, 8, 8), r.cases


def test_values_that_are_not_plain_data_fail() -> None:
    r = run_program("def f():\n    return f", "assert f() is not None", timeout_s=SLACK_S)
    assert r.reason == "test_failed" and "not plain data" in r.detail


def test_the_judge_failing_on_a_value_fails_the_case() -> None:
    r = run_program("def f():\n    return 'a'", "assert f() + 1 == 2", timeout_s=SLACK_S)
    assert r.reason == "test_failed" and "TypeError" in r.detail


def test_bad_tests_are_data_errors() -> None:
    with pytest.raises(DataError, match="line 2: an `assert` inside another statement"):
        run_program("x = 1", "for i in range(2):\n    assert f(i)")
    with pytest.raises(DataError, match="no top-level `assert`"):
        run_program("x = 1", "f(1)")
    with pytest.raises(DataError, match="not valid Python"):
        run_program("x = 1", "assert f(")
    with pytest.raises(DataError, match="tests' own setup failed.*ModuleNotFoundError"):
        run_program("def f():\n    return 1", "from no_such_module_here import tol\nassert abs(f() - 1) < tol",
                    timeout_s=SLACK_S)


def test_stdin_stdout_cases() -> None:
    code = "n = int(input())\nprint(n * 2, '  ')\nprint()"
    io = [{"input": "3\n", "output": "6"}, {"input": "4", "output": "8\n\n"}, {"input": "5", "output": "11"}]
    r = run_program(code, io=io, timeout_s=SLACK_S)
    assert [c.passed for c in r.cases] == [True, True, False] and r.cases[2].detail == "wrong output"
    crash = run_program("print(6)\nraise SystemExit(3)", io=io[:1], timeout_s=SLACK_S)
    assert crash.reason == "error" and crash.passed == 0  # the right output, then a failure: not a pass
    ok = run_program("import sys\nprint(6)\nsys.exit(0)", io=io[:1], timeout_s=SLACK_S)
    assert ok.ok


# ----------------------------------------------------------------------------- legitimate programs


LEGIT = '''
import collections, dataclasses, fractions, json, os, re, shutil, tempfile, threading
from typing import NamedTuple

P = collections.namedtuple("P", "x y")
class Q(NamedTuple):
    a: int
@dataclasses.dataclass
class D:
    v: int = 1
os.makedirs("sub/deeper", exist_ok=True)
with open("sub/deeper/data.json", "w") as f:
    json.dump({"k": [1, 2]}, f)
assert json.load(open("sub/deeper/data.json")) == {"k": [1, 2]}
os.symlink("sub/deeper/data.json", "link.json")
os.rename("link.json", "link2.json")
shutil.rmtree("sub")
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "t"), "w").write("x")
out = []
ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
pid = os.fork()
if pid == 0:
    os._exit(7)
assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 7
r, w = os.pipe()
os.write(w, b"hi")
print(P(1, 2), Q(3), D(), fractions.Fraction(1, 3), sorted(out), re.sub("a", "b", "aa"), os.read(r, 2))

def solve(n):
    return n * (n + 1) // 2
'''


def test_legitimate_program_passes() -> None:
    r = run_program(LEGIT, "assert solve(4) == 10\nassert solve(0) == 0", timeout_s=SLACK_S)
    assert (r.reason, r.ok, r.passed, r.total) == ("ok", True, 2, 2), (r.detail, r.stderr)
    assert r.stdout == "P(x=1, y=2) Q(a=3) D(v=1) 1/3 [0, 1, 2, 3] bb b'hi'\n"
    assert r.returncode == 0 and r.isolation == ISOLATION_BWRAP


def test_environment_is_stripped_and_folder_fresh(monkeypatch) -> None:
    monkeypatch.setenv("GUIDEDRL_SECRET_TOKEN", "hunter2")
    code = "import os\nprint(sorted(os.environ), os.listdir('.'), os.getcwd(), os.getuid())"
    r = run_program(code, timeout_s=SLACK_S)
    assert r.stdout == "['HOME', 'LANG', 'MALLOC_ARENA_MAX', 'PATH', 'PWD', 'TMPDIR'] [] /tmp 65534\n", r.stdout


def test_failure_output_is_captured() -> None:
    r = run_program("import sys\nprint('out')\nprint('oops', file=sys.stderr)\nraise KeyError('k')", timeout_s=SLACK_S)
    assert (r.reason, r.stdout) == ("error", "out\n") and r.stderr.startswith("oops\nTraceback")
    assert r.stderr.endswith("KeyError: 'k'\n") and "harness" not in r.stderr  # the program's frames only


# ----------------------------------------------------------------------------- the jail itself


def test_a_setup_failure_raises_and_cannot_be_faked(monkeypatch) -> None:
    """Only bubblewrap's own status (a channel the program cannot reach) says the jail failed."""
    fake = run_program("import sys\nprint('bwrap: Creating new namespace failed', file=sys.stderr)\nsys.exit(1)",
                       timeout_s=SLACK_S)
    assert fake.reason == "error"
    real = jail._bwrap

    def broken(*args: object) -> list[str]:
        argv = real(*args)  # type: ignore[arg-type]
        return argv[:3] + ["--ro-bind", "/no/such/folder", "/x"] + argv[3:]

    monkeypatch.setattr(jail, "_bwrap", broken)
    with pytest.raises(SandboxError, match="could not set up the jail.*no/such/folder"):
        run_program("print(1)", timeout_s=SLACK_S)


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per jail needs root")
def test_process_limit_is_per_jail() -> None:
    """As root each jail runs under a uid of its own: RLIMIT_NPROC, which the kernel does not apply
    to uid 0, holds, and two jails at their limit do not take each other's processes."""
    code = ("import os, time\nn = 0\ntry:\n    while n < 100:\n        if os.fork() == 0:\n            time.sleep(3)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: run_program(code, nproc=8, timeout_s=SLACK_S).stdout, range(2)))
    assert outs == ["5\n", "5\n"]  # 8 = bwrap + its init + the program + 5 children


TRAINER = """
import sys
sys.path.insert(0, {repo!r})
from guidedrl.sandbox.run import run_program
print("go", flush=True)
run_program({code!r}, timeout_s=100)
"""


def test_sandbox_dies_with_the_trainer(tmp_path: Path) -> None:
    """A trainer killed mid-reward leaves nothing running: bwrap dies with it (--die-with-parent),
    and with bwrap's pid 1 everything in the jail, detached processes included."""
    marker = f"31337.{os.getpid()}"
    code = DETACH.format(marker=marker) + "import time\ntime.sleep(100)"
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(repo=repo, code=code)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"go"
        end = time.monotonic() + 30
        while not leftover_processes(marker) and time.monotonic() < end:
            time.sleep(0.05)
        assert leftover_processes(marker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    end = time.monotonic() + 5
    while (leftover_processes(marker) or leftover_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    assert leftover_processes(marker) == [] and leftover_processes() == []


# ----------------------------------------------------------------------------- the weaker fallback


def test_fallback_is_labelled_in_every_result(monkeypatch) -> None:
    r = run_program("def f():\n    return 1", "assert f() == 1", isolation="rlimits", timeout_s=SLACK_S)
    assert r.ok and r.isolation == ISOLATION_WEAK and "WEAKER" in ISOLATION_WEAK
    s = Sample(id="a", prompt="p", extra={"tests": "assert f() == 1"})
    _, infos = code_reward([s], ["def f():\n    return 1"], isolation="rlimits", timeout_s=SLACK_S)
    assert infos[0]["code/isolation"] == ISOLATION_WEAK


def test_auto_falls_back_with_one_warning_and_bwrap_refuses(monkeypatch) -> None:
    monkeypatch.setattr(jail, "_MODE", {"probe": "no `bwrap` (Debian: apt-get install bubblewrap)"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert isolation_mode("auto") == ISOLATION_WEAK
        assert isolation_mode("auto") == ISOLATION_WEAK
    assert len(caught) == 1 and "WITHOUT file-system, network or process isolation" in str(caught[0].message)
    with pytest.raises(SandboxError, match="bubblewrap cannot run here"):
        isolation_mode("bwrap")
    with pytest.raises(ConfigError, match="code reward: `isolation`: .*bubblewrap cannot run here"):
        make_code_reward(isolation="bwrap")


# ----------------------------------------------------------------------------- the reward


def test_extract_code() -> None:
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"  # the last block
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("d = 4") == "d = 4"


def test_code_reward_runs_in_parallel_and_isolates_runs() -> None:
    samples = [Sample(id=str(i), prompt="p", extra={"tests": "assert add(2, 3) == 5"}) for i in range(4)]
    samples[3] = Sample(id="3", prompt="p")  # no tests: not applicable
    good = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    bomb = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    scores, infos = code_reward(samples, [good, bomb, good, good], workers=4, timeout_s=SLACK_S)
    # the fork bomb hits its own process limit; the runs beside it are unaffected
    assert scores == [1.0, 0.0, 1.0, None]
    assert [i["code/reason"] for i in infos] == ["ok", "process_limit", "ok", "no_tests"]
    assert infos[0]["code/passed"] == infos[0]["code/total"] == 1 and infos[0]["code/isolation"] == ISOLATION_BWRAP


def test_code_reward_io_tests_and_bad_tests() -> None:
    s = Sample(id="a", prompt="p", extra={"tests": ["assert f() == 1", "assert f() != 2"],
                                          "io_tests": [{"input": "", "output": "hi"}]})
    assert code_reward([s], ["def f():\n    return 1\nprint('hi')"], timeout_s=SLACK_S)[0] == [1.0]
    assert code_reward([s], ["def f():\n    return 1"], timeout_s=SLACK_S, partial=True)[0] == [pytest.approx(2 / 3)]
    with pytest.raises(DataError, match="sample `b`: `tests` must be"):
        code_reward([Sample(id="b", prompt="p", extra={"tests": 3})], ["x = 1"])
    with pytest.raises(DataError, match="sample `c`: `io_tests`: must be a non-empty list"):
        code_reward([Sample(id="c", prompt="p", extra={"io_tests": [{"input": 1}]})], ["x = 1"])


def test_make_code_reward_checks_args() -> None:
    fn = make_code_reward(timeout_s=SLACK_S, partial=True)
    s = Sample(id="a", prompt="p", extra={"tests": "assert f() == 1\nassert f() == 2"})
    assert fn([s], ["def f():\n    return 1"])[0] == [0.5]
    with pytest.raises(ConfigError, match="unknown argument"):
        make_code_reward(timeout=3)
    with pytest.raises(ConfigError, match="memory_mb"):
        make_code_reward(memory_mb=0)
    with pytest.raises(ConfigError, match="isolation"):
        make_code_reward(isolation="namespaces")
    with pytest.raises(ConfigError, match="timeout_s"):
        Limits(timeout_s=-1)


def test_registry_binds_code_reward() -> None:
    from guidedrl.core.config import RewardTerm
    from guidedrl.rewards import build_reward

    reward = build_reward([RewardTerm(name="code", args={"timeout_s": SLACK_S})], [])
    s = Sample(id="a", prompt="p", extra={"tests": "assert g(2) == 4"})
    totals, infos = reward([s, s], ["def g(x):\n    return x * x", "def g(x):\n    return x + 3"])
    assert totals == [1.0, 0.0] and infos[1]["code/reason"] == "test_failed"
    with pytest.raises(ConfigError, match=r"reward\.terms\[0\]\.args.*timeout"):  # a typo names the key
        build_reward([RewardTerm(name="code", args={"timeout": 5})], [])
    with pytest.raises(ConfigError, match=r"reward\.terms\[0\]\.args.*memory_mb"):  # a bad value: at build time too
        build_reward([RewardTerm(name="code", args={"memory_mb": 0})], [])


def test_forge_tests_constant_is_hidden() -> None:
    """The suite's forging rows rely on 23456 being only in the judge's half of FORGE_TESTS."""
    from guidedrl.sandbox.cases import parse_asserts

    (case,), _ = parse_asserts(FORGE_TESTS, "t")
    assert "23456" not in " ".join(case.leaves + case.setup) and "23456" in case.expr
