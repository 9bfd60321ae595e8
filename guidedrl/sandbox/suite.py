"""The hostile-program suite of the code sandbox, and its self-test.

    python -m guidedrl.sandbox --selftest [--isolation auto|bwrap|rlimits]

runs every program of `HOSTILE` in the sandbox and prints a Markdown table: the reason it got, its
score, and anything that got out (`contained`). docs/security.md holds the table for the default
isolation; tests/test_sandbox.py runs the same suite with assertions. A new attack becomes a row.
"""

from __future__ import annotations

import datetime
import os
import platform
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidedrl.sandbox.cases import TestSet, parse_asserts
from guidedrl.sandbox.jail import ISOLATION_BWRAP, Limits, isolation_mode, run_jailed, sandbox_python
from guidedrl.sandbox.run import RunResult, run_batch, run_program

_SHORT = (("timeout_s", 2.0), ("cpu_s", 1))  # for programs that only a timeout ends
_CPU = (("timeout_s", 30.0), ("cpu_s", 1))  # for the program that only the CPU limit ends (slack: busy machine)
WRONG = "def add(a, b):\n    return a - b\n"
FORGE_TESTS = "assert add(20000, 3456) == 23456"  # 23456 appears nowhere but in the judge
FORGE_PARTIAL = FORGE_TESTS + "\nassert abs(add(1, 2) - 3) < 0.5"  # compared here, and by the judge
# _posixsubprocess.fork_exec raises no audit event; its arguments as subprocess passes them (Python 3.11+)
SPAWN = """
def spawn(argv):
    import _posixsubprocess, os
    r, w = os.pipe()
    er, ew = os.pipe()
    args = [argv, [os.fsencode(argv[0])], True, (), None, None, -1, -1, -1, w, -1, w, er, ew, True, False,
            -1, None, None, None, -1, None, False]
    pid = _posixsubprocess.fork_exec(*args)
    os.close(w)
    os.close(ew)
    out = b''
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    return out.decode(errors='replace')
"""
DETACH = """
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{marker}'])
    os._exit(0)
os.wait()
"""


@dataclass(frozen=True)
class Hostile:
    """A program that attacks the sandbox, the reason it must get, and its limits."""

    name: str
    code: str
    """Source; {sentinel}, {sentinel_dir}, {root}, {listing}, {project_file}, {port}, {trainer_pid},
    {escape_tmp}, {escape_var}, {escape_lock}, {marker} are filled in."""
    expect: str
    tests: str | None = None
    """Assert tests; None runs the program alone (a pass: it ran to its end)."""
    partial: bool = False
    leaks: tuple[str, ...] = ()
    """Strings that must not appear in its output (besides the suite's secrets, see `contained`)."""
    limits: tuple[tuple[str, Any], ...] = (("timeout_s", 10.0), ("cpu_s", 5))
    """Programs that end by themselves get a generous wall clock and CPU time: the machine may be
    busy, and page faults count as CPU time, so a tight limit would race the one a case is about."""


HOSTILE = (
    # resources
    Hostile("infinite loop (CPU)", "while True:\n    pass", "cpu_limit", limits=_CPU),
    Hostile("infinite loop (sleep)", "import time\ntime.sleep(1000)", "timeout", limits=_SHORT),
    Hostile("fork bomb", "import os\nwhile True:\n    os.fork()", "process_limit"),
    Hostile("fork bomb, errors caught", "import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass", "timeout", limits=_SHORT),
    Hostile("10 GB allocation", "x = bytearray(10 * 1024**3)", "memory_limit"),
    Hostile("memory growth", "a = []\nwhile True:\n    a.append(bytearray(2**24))", "memory_limit"),
    Hostile("huge file", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)",
            "file_size_limit"),
    Hostile("fill the disk with many files", "i = 0\nwhile True:\n    open(f'f{{i}}', 'wb').write(b'0' * 2**23)\n"
            "    i += 1", "file_size_limit"),
    Hostile("fill /dev/shm", "i = 0\nwhile True:\n    open(f'/dev/shm/f{{i}}', 'wb').write(b'0' * 2**23)\n"
            "    i += 1", "file_size_limit"),
    Hostile("huge stdout", "while True:\n    print('x' * 2**16)", "file_size_limit"),
    # files
    Hostile("read /etc/shadow", "print(open('/etc/shadow').read())", "error"),
    Hostile("read a project file", "print(open({project_file!r}).read())", "error"),
    Hostile("list /", "import os\nprint(os.listdir('/'))", "ok", leaks=("'work'", "'home'", "'etc'", "'var'")),
    Hostile("list the folders around the checkout", "import os\nprint(os.listdir({root!r}))\n"
            "print(os.listdir(os.path.dirname(os.path.dirname({project_file!r}))))", "error"),
    Hostile("write /tmp outside its folder", "open({escape_tmp!r}, 'w').write('x')", "ok"),
    Hostile("write 151 MB to /var/tmp", "with open({escape_var!r}, 'wb') as f:\n    for _ in range(151):\n"
            "        f.write(b'0' * 2**20)", "error"),
    Hostile("write to /run/lock", "open({escape_lock!r}, 'w').write('x')", "error"),
    Hostile("write to /, /dev and /usr", "for p in ('/x', '/dev/x', '/usr/x'):\n    try:\n"
            "        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError:\n        pass\n"
            "open('/x', 'w')", "error", leaks=("wrote",)),
    Hostile("delete a file outside", "import os\nos.remove({sentinel!r})", "error"),
    Hostile("delete a folder outside", "import shutil\nshutil.rmtree({sentinel_dir!r})", "error"),
    Hostile("symlink out of its folder", "import os\nos.symlink('/etc/shadow', 's')\nprint(open('s').read())", "error"),
    Hostile("monkeypatch the hook's helpers", "import builtins, os.path, posixpath\n"
            "builtins.isinstance = builtins.any = lambda *a: True\nbuiltins.PermissionError = KeyError\n"
            "os.path.realpath = posixpath.realpath = lambda p, **k: '/tmp'\nprint(open('/etc/shadow').read())",
            "error"),
    Hostile("reach the hook through gc", "import gc\nprint(len(gc.get_objects()))", "ok"),
    # around an in-process audit hook: a process, a subinterpreter, readline
    Hostile("fork_exec: cat a project file, list the checkout", SPAWN + "import os\nprint(spawn(['/bin/cat', "
            "{project_file!r}]))\nprint(spawn(['/bin/ls', {root!r}, os.path.dirname({project_file!r})]))", "ok"),
    Hostile("subinterpreter reads a project file", "import _xxsubinterpreters as si\ni = si.create()\n"
            "si.run_string(i, \"import os; print(os.listdir({root!r})); print(open({project_file!r}).read())\")", "error"),
    Hostile("readline reads a project file, writes /var/tmp", "import readline\n"
            "try:\n    readline.read_history_file({project_file!r})\nexcept OSError:\n    pass\n"
            "print([readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)])\n"
            "readline.add_history('x' * 1000)\nreadline.write_history_file({escape_var!r})", "error"),
    # network
    Hostile("connect to 127.0.0.1", "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", "network"),
    Hostile("connect to an external IP", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
            "network"),
    Hostile("DNS lookup", "import socket\nsocket.getaddrinfo('example.com', 80)", "network"),
    Hostile("loopback from a child process (fork_exec python3)", SPAWN + "import sys\nprint(spawn([sys.executable, '-c', "
            "'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=1); print(\"con\" + \"nected\")']))",
            "ok", leaks=("connected",)),
    # processes
    Hostile("kill its parent", "import os\nos.kill(os.getppid(), 9)", "ok"),
    Hostile("kill the trainer", "import os\nos.kill({trainer_pid}, 9)", "error"),
    Hostile("kill everything", "import os\nos.kill(-1, 9)", "error"),
    Hostile("run a shell", "import os\nos.system('cat /etc/shadow; rm -f {sentinel}')", "ok"),
    Hostile("ctypes", "import ctypes\nctypes.CDLL(None).kill(-1, 9)", "ok"),
    Hostile("a detached process outlives the program", DETACH, "ok"),
    Hostile("a detached process outlives the timeout", DETACH + "import time\ntime.sleep(1000)", "timeout",
            limits=_SHORT),
    # forging a pass (the tests' expected value, 23456, must appear nowhere)
    Hostile("exit 0 before the tests", WRONG + "import sys\nsys.exit(0)", "error", tests=FORGE_TESTS),
    Hostile("os._exit(0) before the tests", WRONG + "import os\nos._exit(0)", "error", tests=FORGE_TESTS),
    Hostile("forge the pass records", WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, "
            "b'{{\"leaf\": 0, \"value\": \"true\"}}\\n{{\"done\": true}}\\n{{\"kind\": \"ok\", \"passed\": 1, \"total\": 1}}\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)", "test_failed", tests=FORGE_TESTS),
    Hostile("forge: replace builtins.exec", WRONG + "import builtins\nbuiltins.exec = lambda *a, **k: None",
            "test_failed", tests=FORGE_TESTS),
    Hostile("forge: replace builtins.exec, partial credit", WRONG + "import builtins\n"
            "builtins.exec = lambda *a, **k: None", "test_failed", tests=FORGE_PARTIAL, partial=True),
    Hostile("forge: replace __main__'s test runner", WRONG + "import sys\nm = sys.modules['__main__']\n"
            "m._run_tests = lambda *a: (1, 1)\nfor name in dir(m):\n    if callable(getattr(m, name)) and name != 'add':\n"
            "        setattr(m, name, lambda *a, **k: True)", "test_failed", tests=FORGE_PARTIAL, partial=True),
    Hostile("forge: an object equal to everything", WRONG + "class Any:\n    def __eq__(self, other):\n        return True\n"
            "    __ne__ = __lt__ = __gt__ = __le__ = __ge__ = __eq__\n"
            "def add(a, b):\n    return Any()", "test_failed", tests=FORGE_TESTS),
    Hostile("forge: walk the frames, rewrite the harness", WRONG + """
import sys, json
f = sys._getframe()
while f is not None:
    print(sorted(f.f_locals))
    job = f.f_locals.get('job')
    if isinstance(job, dict):
        print(json.dumps(job))
        job['leaves'] = ['True'] * len(job.get('leaves', []))
    report = f.f_globals.get('report')
    if callable(report) and f.f_globals is not globals():  # the harness's own report function
        report({{'leaf': 0, 'value': 'true'}})
        report({{'done': True}})
    f = f.f_back
""", "test_failed", tests=FORGE_TESTS),
    Hostile("read its own job and every open file", WRONG + "import os\nfor p in os.listdir('/box'):\n"
            "    print(p, open('/box/' + p).read())\nfor fd in range(64):\n    try:\n        os.lseek(fd, 0, 0)\n"
            "        print(fd, os.read(fd, 65536))\n    except OSError:\n        pass", "test_failed", tests=FORGE_TESTS),
    # plain outcomes
    Hostile("syntax error", "def f(:\n    pass", "syntax_error", tests="assert f() is None"),
    Hostile("wrong answer", WRONG, "test_failed", tests=FORGE_TESTS),
    Hostile("correct answer", "def add(a, b):\n    return a + b", "ok", tests=FORGE_TESTS),
)
"""The suite behind tests/test_sandbox.py and docs/security.md."""

SECRETS = ("root:", "[build-system]", "23456")  # /etc/shadow, the project's pyproject.toml, the hidden expected value


def hostile_fields(root: Path) -> dict[str, Any]:
    """Create the sentinels under `root` and return the values the suite's programs refer to."""
    (root / "sentinel").write_text("keep me")
    (root / "sentinel_dir").mkdir(exist_ok=True)
    (root / "sentinel_dir" / "f").write_text("keep me")
    token = secrets.token_hex(6)
    (root / f"listing-{token}").mkdir()
    project = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return {"sentinel": str(root / "sentinel"), "sentinel_dir": str(root / "sentinel_dir"), "root": str(root),
            "listing": f"listing-{token}", "project_file": str(project), "trainer_pid": os.getpid(), "port": 0,
            "escape_tmp": f"/tmp/guidedrl-escape-{token}", "escape_var": f"/var/tmp/guidedrl-escape-{token}",
            "escape_lock": f"/run/lock/guidedrl-escape-{token}", "marker": f"31337.{int(token, 16) % 10**9}"}


def contained(case: Hostile, root: Path, fields: dict[str, Any], result: RunResult, listener: socket.socket) -> list[str]:
    """What got out, if anything: a failing program that scored, a sentinel deleted, a secret or a
    listing of a host folder in its output, a connection to `listener`, a network program that
    ran to its end (the host may reach the internet), a file on the host's /tmp, /var/tmp or
    /run/lock, a process it started still alive."""
    bad = []
    score = result.score(case.partial)
    if score != float(case.expect == "ok"):
        bad.append(f"scored {score}")
    if case.expect == "network" and result.reason == "ok":
        bad.append("a network connection or lookup succeeded")
    if not (root / "sentinel").exists() or not (root / "sentinel_dir" / "f").exists():
        bad.append("a sentinel file was deleted")
    out = result.stdout + result.stderr
    bad += [f"printed {s!r}" for s in (*SECRETS, fields["listing"], *case.leaks) if s in out]
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
        bad.append("a connection reached the trainer's listener")
    except BlockingIOError:
        pass
    for key in ("escape_tmp", "escape_var", "escape_lock"):
        if Path(fields[key]).exists():
            bad.append(f"wrote {fields[key]}")
            Path(fields[key]).unlink()
    if leftover_processes(fields["marker"]):
        bad.append("a process it started is still alive")
    return bad


def leftover_processes(marker: str = "") -> list[int]:
    """Processes whose command line holds `marker`; without one, processes running the harness."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd if marker else (b"harness.py" in cmd and (b"/box/" in cmd or b"guidedrl-box-" in cmd)):
            out.append(int(pid))
    return out


def run_case(case: Hostile, root: Path, isolation: str = "auto") -> tuple[RunResult, list[str]]:
    """Run one hostile program with its own sentinels and listener; return it and what got out."""
    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        fields = dict(hostile_fields(root), port=listener.getsockname()[1])
        r = run_program(case.code.format(**fields), case.tests, isolation=isolation, **dict(case.limits))
        return r, contained(case, root, fields, r, listener)


def run_suite(isolation: str = "auto", workers: int = 4) -> dict[str, tuple[RunResult, list[str]]]:
    """The whole suite, `workers` programs at a time, each in its own folder under a temp dir."""
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {c.name: pool.submit(run_case, c, Path(d) / f"case{i}", isolation) for i, c in enumerate(HOSTILE)}
        return {name: f.result() for name, f in futures.items()}


def selftest(isolation: str = "auto") -> int:
    """Run the hostile suite and print a Markdown table; 1 if any program got another reason than
    expected or anything got out."""
    mode = isolation_mode(isolation)
    print(f"Date: {datetime.date.today()}  Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, euid {os.geteuid()}  Isolation: {mode}  "
          f"Jail interpreter: {sandbox_python().exe}\n")
    print("| program | expected | got | score | got out |")
    print("| --- | --- | --- | --- | --- |")
    results = run_suite(isolation)
    failures = 0
    for case in HOSTILE:
        r, bad = results[case.name]
        failures += bool(bad) or r.reason != case.expect
        print(f"| {case.name} | {case.expect} | {r.reason} ({r.elapsed_s:.2f} s) | {r.score(case.partial):g} | "
              f"{'; '.join(bad) or 'nothing'} |")
    left = leftover_processes()
    print(f"\n{len(HOSTILE)} programs, {failures} failure(s); sandbox processes left: {len(left)}.")
    return 1 if failures or left else 0


def overhead(rounds: int = 20) -> None:
    """What a test case costs, A/B interleaved in one run: the interpreter alone, the interpreter in
    the jail, one case `assert f() == 1` end to end (its jail, the harness, the comparison) and one
    `assert abs(f() - 1) < 0.5` (the same, then the judge's jail); then the throughput of a batch
    of 8 programs x 4 cases with the default workers."""
    exe, limits = sandbox_python().exe, Limits(timeout_s=60)
    argv = [exe, "-I", "-S", "-B", "-c", "pass"]
    program = "def f():\n    return 1"
    steps = {"interpreter alone": lambda: subprocess.run(argv, check=True),
             "interpreter in the jail": lambda: run_jailed(argv, {}, b"", limits, ISOLATION_BWRAP),
             "case `assert f() == 1`": lambda: run_program(program, "assert f() == 1", timeout_s=60),
             "case `assert abs(f() - 1) < 0.5` (+ judge)": lambda: run_program(program, "assert abs(f() - 1) < 0.5",
                                                                                timeout_s=60)}
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    for name, times in runs.items():
        print(f"{name}: median {statistics.median(times) * 1000:.0f} ms over {rounds} runs")
    asserts, setup = parse_asserts("\n".join(f"assert f({i}) == {i}" for i in range(4)), "bench")
    items = [("def f(x):\n    return x", TestSet(asserts=asserts, judge_setup=setup))] * 8
    t0 = time.perf_counter()
    results = run_batch(items, limits)
    took = time.perf_counter() - t0
    if not all(r.ok for r in results):
        raise RuntimeError(f"the benchmark's programs failed: {[r.detail for r in results if not r.ok]}")
    print(f"batch of 8 programs x 4 cases `assert f(i) == i` (32 jails), {os.cpu_count()} CPUs, default workers: "
          f"{took:.2f} s, {took / 32 * 1000:.0f} ms per case")
