"""The code-execution sandbox: the hostile-program suite (each attack gets the right reason and is
contained; the machine and this process are unaffected), legitimate programs, and the reward."""

from __future__ import annotations

import dis
import os
import socket
import subprocess
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guidedrl.core.errors import ConfigError, DataError
from guidedrl.sandbox import hook as sandbox_hook
from guidedrl.rewards.code import code_reward, extract_code, make_code_reward
from guidedrl.sandbox.exec import Limits, RunResult, isolation_mode, run_program
from guidedrl.sandbox.suite import HOSTILE, Hostile, contained, hostile_fields, leftover_processes
from guidedrl.core.types import Sample

NAMESPACES = isolation_mode("auto") == "namespaces"
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="this OS refuses namespaces: basic isolation only")
# limits that the OS layers enforce by themselves: the same reason with or without the audit hook
SLACK_S = 60.0  # wall clock for tests not about time: a busy machine must not turn a pass into a timeout
OS_REASONS = {"cpu_limit", "timeout", "process_limit", "memory_limit", "file_size_limit", "network",
              "syntax_error", "test_failed", "ok"}


def _one(case: Hostile, root: Path, isolation: str, audit: bool) -> tuple[RunResult, list[str]]:
    """Run one hostile program with its own sentinels and listener; return what escaped."""
    root.mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        fields = dict(hostile_fields(root), port=listener.getsockname()[1])
        r = run_program(case.code.format(**fields), case.tests, isolation=isolation, audit=audit, **dict(case.limits))
        return r, contained(root, fields, r, listener, processes=False, expect=case.expect)


def _suite(tmp: Path, isolation: str, audit: bool) -> dict[str, tuple[RunResult, list[str]]]:
    """The whole suite, 4 programs at a time (each in its own sandbox uid), then a check that no
    sandbox process outlived its run and that this process can still start processes."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {c.name: pool.submit(_one, c, tmp / f"case{i}", isolation, audit) for i, c in enumerate(HOSTILE)}
        out = {name: f.result() for name, f in futures.items()}
    assert leftover_processes() == []
    assert subprocess.run(["true"]).returncode == 0
    return out


@pytest.fixture(scope="module")
def all_layers(tmp_path_factory) -> dict[str, tuple[RunResult, list[str]]]:
    return _suite(tmp_path_factory.mktemp("all"), "auto", audit=True)


@pytest.fixture(scope="module")
def os_layers(tmp_path_factory) -> dict[str, tuple[RunResult, list[str]]]:
    return _suite(tmp_path_factory.mktemp("os"), "namespaces", audit=False)


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> dict[str, tuple[RunResult, list[str]]]:
    return _suite(tmp_path_factory.mktemp("basic"), "basic", audit=True)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_all_layers(case: Hostile, all_layers) -> None:
    r, escaped = all_layers[case.name]
    assert (r.reason, escaped) == (case.expect, []), (r.detail, r.stderr[-800:])
    assert r.ok == (case.expect == "ok") and r.score() == float(case.expect == "ok")


@needs_namespaces
@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_os_layers_alone_contain(case: Hostile, os_layers) -> None:
    """Without the audit hook the reason may be vaguer (a denied read is a FileNotFoundError in
    the empty tmpfs over the project), but nothing escapes and the limits still name themselves."""
    r, escaped = os_layers[case.name]
    assert escaped == [], r.detail
    if case.expect in OS_REASONS:
        assert r.reason == case.expect, (r.detail, r.stderr[-800:])


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_basic_isolation(case: Hostile, basic) -> None:
    r, escaped = basic[case.name]
    assert (r.reason, escaped) == (case.expect, []), (r.detail, r.stderr[-800:])


def test_hook_reads_no_global_names() -> None:
    """A program can rebind any module attribute or builtin; the hook must not look any up."""
    found = []

    def walk(code: types.CodeType, top: bool) -> None:
        for ins in dis.get_instructions(code):
            if not top and ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                found.append(f"{code.co_name}: {ins.argval}")
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const, False)

    factories = [v for k, v in vars(sandbox_hook).items() if k.startswith(("make_", "_make_"))]
    assert len(factories) == 5
    for f in factories:
        walk(f.__code__, True)  # the factory body runs before the program; what it returns must not
    assert found == []


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


def test_legitimate_program_is_not_flagged() -> None:
    r = run_program(LEGIT, "assert solve(4) == 10\nassert solve(0) == 0", timeout_s=SLACK_S)
    assert (r.reason, r.ok, r.passed, r.total) == ("ok", True, 2, 2), (r.detail, r.stderr)
    assert r.stdout == "P(x=1, y=2) Q(a=3) D(v=1) 1/3 [0, 1, 2, 3] bb b'hi'\n"
    assert r.returncode == 0 and r.isolation in ("namespaces", "basic")


def test_wrong_answer_partial_credit() -> None:
    code = "def f(x):\n    return x * 2 if x < 3 else 0"
    tests = "x = 1\nassert f(1) == 2\nassert f(2) == 4\nassert f(3) == 6"
    r = run_program(code, tests, partial=True, timeout_s=SLACK_S)
    # asserts 1 and 2 pass, 3 fails: 2 of 3; a non-assert line (x = 1) does not count
    assert (r.reason, r.passed, r.total) == ("test_failed", 2, 3)
    assert r.score(partial=True) == pytest.approx(2 / 3) and r.score() == 0.0
    r = run_program(code, tests, timeout_s=SLACK_S)
    assert (r.reason, r.passed, r.total, r.score(partial=True)) == ("test_failed", 0, 0, 0.0)
    assert "assert f(3) == 6" in r.stderr  # the traceback shows the failing test line


def test_output_is_captured_and_truncated() -> None:
    r = run_program("import sys\nprint('a' * 100)\nprint('oops', file=sys.stderr)", None, max_output=10, timeout_s=SLACK_S)
    assert r.ok and r.stdout == "a" * 10 + "\n[... output truncated]" and r.stderr == "oops\n"


def test_environment_is_stripped_and_folder_fresh(monkeypatch) -> None:
    monkeypatch.setenv("GUIDEDRL_SECRET_TOKEN", "hunter2")
    code = "import os\nprint(sorted(os.environ), os.listdir('.'), os.getcwd() == os.environ['HOME'])"
    r = run_program(code, timeout_s=SLACK_S)
    assert "hunter2" not in r.stdout and "GUIDEDRL_SECRET_TOKEN" not in r.stdout
    assert r.stdout.startswith("['HOME', 'LANG', 'PATH', 'TMPDIR'] [] True"), r.stdout


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
    # the fork bomb hits its own process limit; the runs beside it (other uids) are unaffected
    assert scores == [1.0, 0.0, 1.0, None]
    assert [i["code/reason"] for i in infos] == ["ok", "process_limit", "ok", "no_tests"]
    assert infos[0]["code/passed"] == infos[0]["code/total"] == 1


def test_code_reward_tests_list_and_bad_tests() -> None:
    s = Sample(id="a", prompt="p", extra={"tests": ["assert f() == 1", "assert f() != 2"]})
    assert code_reward([s], ["def f():\n    return 1"], timeout_s=SLACK_S)[0] == [1.0]
    with pytest.raises(DataError, match="sample `b`"):
        code_reward([Sample(id="b", prompt="p", extra={"tests": 3})], ["x = 1"])


def test_make_code_reward_checks_args() -> None:
    fn = make_code_reward(timeout_s=SLACK_S, partial=True)
    s = Sample(id="a", prompt="p", extra={"tests": "assert f() == 1\nassert f() == 2"})
    assert fn([s], ["def f():\n    return 1"])[0] == [0.5]
    with pytest.raises(ConfigError, match="unknown argument"):
        make_code_reward(timeout=3)
    with pytest.raises(ConfigError, match="memory_mb"):
        make_code_reward(memory_mb=0)
    with pytest.raises(ConfigError, match="isolation"):
        make_code_reward(isolation="docker")
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


TRAINER = """
import sys, time
sys.path.insert(0, {repo!r})
from guidedrl.sandbox.exec import run_program
print("go", flush=True)
run_program({code!r}, timeout_s=100, isolation={iso!r})
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="finding the sandbox's processes needs its own uid (root)")
@pytest.mark.parametrize("iso", ["namespaces", "basic"])
def test_sandbox_dies_with_the_trainer(iso: str, tmp_path: Path) -> None:
    """A trainer killed mid-reward leaves nothing running: the runner, init and the program die
    with their parents (PR_SET_PDEATHSIG), and with init the whole pid namespace. In basic
    isolation a child the program forked would outlive it (docs/security.md): one process here."""
    if iso == "namespaces" and not NAMESPACES:
        pytest.skip("this OS refuses namespaces")
    code = "import os, time\nos.fork()\ntime.sleep(100)" if iso == "namespaces" else "import time\ntime.sleep(100)"
    want = 2 if iso == "namespaces" else 1
    import signal
    import sys
    import time

    repo = str(Path(__file__).resolve().parents[1])
    top = Path(tempfile.gettempdir())
    for p in [tmp_path, *tmp_path.parents][: tmp_path.parents.index(top) + 1]:  # its temp folder outlives
        p.chmod(p.stat().st_mode | 0o111)  # it: keep it under tmp_path, traversable by the sandbox uid
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(repo=repo, iso=iso, code=code)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"go"
        end = time.monotonic() + 30
        while len(leftover_processes()) < want and time.monotonic() < end:
            time.sleep(0.05)
        assert len(leftover_processes()) == want
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    end = time.monotonic() + 5
    while leftover_processes() and time.monotonic() < end:
        time.sleep(0.05)
    assert leftover_processes() == []
