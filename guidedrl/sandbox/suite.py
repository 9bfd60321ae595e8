"""The hostile-program suite of the code sandbox, and its self-test.

    python -m guidedrl.sandbox --selftest

runs every program of `HOSTILE` twice (all layers; OS layers only, without the audit hook) and
prints a Markdown table of the reasons and of anything that escaped (docs/security.md holds one).
tests/test_sandbox.py runs the same suite with assertions.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidedrl.sandbox.exec import UID_BASE, RunResult, _owner, isolation_mode, run_program

_SHORT = (("timeout_s", 2.0), ("cpu_s", 1))  # for programs that only a timeout ends
_CPU = (("timeout_s", 30.0), ("cpu_s", 1))  # for the program that only the CPU limit ends (slack: busy machine)


@dataclass(frozen=True)
class Hostile:
    """A program that attacks the sandbox, the reason it must get, and its limits."""

    name: str
    code: str
    """Source; {sentinel}, {sentinel_dir}, {project_file}, {port}, {trainer_pid}, {escape} are filled in."""
    expect: str
    tests: str = "assert True"
    limits: tuple[tuple[str, Any], ...] = (("timeout_s", 10.0), ("cpu_s", 5))
    """Programs that end by themselves get a generous wall clock and CPU time: the machine may be
    busy, and page faults count as CPU time (growing to 512 MB takes 0.4-1.3 s of it in a VM), so
    a tight CPU limit would race the limit a case is about."""


HOSTILE = (
    Hostile("infinite loop (CPU)", "while True:\n    pass", "cpu_limit", limits=_CPU),
    Hostile("infinite loop (sleep)", "import time\ntime.sleep(1000)", "timeout", limits=_SHORT),
    Hostile("fork bomb", "import os\nwhile True:\n    os.fork()", "process_limit"),
    Hostile("fork bomb, errors caught", "import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass", "process_limit", limits=_SHORT),
    Hostile("10 GB allocation", "x = bytearray(10 * 1024**3)", "memory_limit"),
    Hostile("memory growth", "a = []\nwhile True:\n    a.append(bytearray(2**24))", "memory_limit"),
    Hostile("huge file", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)",
            "file_size_limit"),
    Hostile("fill the disk with many files", "i = 0\nwhile True:\n    open(f'f{{i}}', 'wb').write(b'0' * 2**23)\n"
            "    i += 1", "file_size_limit"),
    Hostile("huge stdout", "while True:\n    print('x' * 2**16)", "file_size_limit"),
    Hostile("read /etc/shadow", "print(open('/etc/shadow').read())", "forbidden_access"),
    Hostile("read a project file", "print(open({project_file!r}).read())", "forbidden_access"),
    Hostile("list /", "import os\nprint(os.listdir('/'))", "forbidden_access"),
    Hostile("write /tmp outside its folder", "open({escape!r}, 'w').write('x')", "forbidden_access"),
    Hostile("delete a file outside", "import os\nos.remove({sentinel!r})", "forbidden_access"),
    Hostile("delete a folder outside", "import shutil\nshutil.rmtree({sentinel_dir!r})", "forbidden_access"),
    Hostile("connect to 127.0.0.1", "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            "network"),
    Hostile("connect to an external IP", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
            "network"),
    Hostile("DNS lookup", "import socket\nsocket.getaddrinfo('example.com', 80)", "network"),
    Hostile("kill its parent", "import os\nos.kill(os.getppid(), 9)", "forbidden_access"),
    Hostile("kill the trainer", "import os\nos.kill({trainer_pid}, 9)", "forbidden_access"),
    Hostile("kill everything", "import os\nos.kill(-1, 9)", "forbidden_access"),
    Hostile("run a shell", "import os\nos.system('cat /etc/shadow; rm -f {sentinel}')", "forbidden_access"),
    Hostile("ctypes", "import ctypes\nctypes.CDLL(None).kill(-1, 9)", "forbidden_access"),
    Hostile("symlink out of its folder", "import os\nos.symlink('/etc/shadow', 's')\nprint(open('s').read())",
            "forbidden_access"),
    Hostile("monkeypatch the hook's helpers", "import builtins, os.path, posixpath\n"
            "builtins.isinstance = builtins.any = lambda *a: True\nbuiltins.PermissionError = KeyError\n"
            "os.path.realpath = posixpath.realpath = lambda p, **k: '/tmp'\nprint(open('/etc/shadow').read())",
            "forbidden_access"),
    Hostile("reach the hook through gc", "import gc\nprint(len(gc.get_objects()))", "forbidden_access"),
    Hostile("exit 0 before the tests", "import sys\nsys.exit(0)", "error", tests="assert False"),
    Hostile("os._exit(0) before the tests", "import os\nos._exit(0)", "error", tests="assert False"),
    Hostile("forge the pass record", "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, "
            "b'{{\"kind\": \"ok\", \"nonce\": \"\", \"passed\": 1, \"total\": 1}}\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)", "error", tests="assert False"),
    Hostile("syntax error", "def f(:\n    pass", "syntax_error"),
    Hostile("wrong answer", "def add(a, b):\n    return a - b", "test_failed", tests="assert add(2, 3) == 5"),
    Hostile("correct answer", "def add(a, b):\n    return a + b", "ok", tests="assert add(2, 3) == 5"),
)
"""The suite behind tests/test_sandbox.py and docs/security.md."""


def hostile_fields(root: Path) -> dict[str, Any]:
    """Create the sentinels under `root` and return the values the suite's programs refer to."""
    (root / "sentinel").write_text("keep me")
    (root / "sentinel_dir").mkdir(exist_ok=True)
    (root / "sentinel_dir" / "f").write_text("keep me")
    project = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return {"sentinel": str(root / "sentinel"), "sentinel_dir": str(root / "sentinel_dir"),
            "project_file": str(project if project.exists() else Path(__file__).resolve()),
            "trainer_pid": os.getpid(), "port": 0, "escape": f"/tmp/guidedrl-escape-{secrets.token_hex(6)}"}


def contained(root: Path, fields: dict[str, Any], result: RunResult, listener: Any, processes: bool = True,
              expect: str = "") -> list[str]:
    """What escaped, if anything: sentinels gone, secrets printed (from /etc/shadow or the project),
    a connection to `listener`, a network program (`expect == "network"`) that ran to its end (its
    connection or lookup succeeded: `create_connection` raises otherwise, and the host may reach
    the internet), a file written to the host's /tmp, and (`processes`) a process of a sandbox uid
    still alive (only meaningful when no other program is running)."""
    bad = []
    if expect == "network" and result.reason == "ok":
        bad.append("a network connection or lookup succeeded")
    if not (root / "sentinel").exists() or not (root / "sentinel_dir" / "f").exists():
        bad.append("a sentinel file was deleted")
    out = result.stdout + result.stderr
    if "root:" in out or "[build-system]" in out:
        bad.append("a secret was printed")
    listener.setblocking(False)
    try:
        listener.accept()
        bad.append("a connection reached the trainer's listener")
    except BlockingIOError:
        pass
    if Path(fields["escape"]).exists():
        bad.append("a file was written to the host's /tmp")
    alive = leftover_processes() if processes else []
    if alive:
        bad.append(f"sandbox processes still alive: {alive}")
    return bad


def leftover_processes() -> list[int]:
    """Processes of any sandbox uid (root only; without root the sandbox has no uid of its own)."""
    if os.geteuid() != 0:
        return []
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_owner(f"/proc/{p}") or 0) >= UID_BASE]


def selftest(isolation: str = "auto") -> int:
    """Run the hostile suite with every layer and with the OS layers only; print a Markdown table.
    Returns 1 if, with every layer, a program got another reason than expected or anything
    escaped, or if anything escaped the OS layers alone with namespaces (their claimed boundary)."""
    import datetime
    import platform
    import socket

    mode = isolation_mode(isolation)  # type: ignore[arg-type]
    print(f"Date: {datetime.date.today()}  Machine: {platform.node()} ({platform.platform()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, euid {os.geteuid()})  Isolation: {mode}\n")
    print("| program | expected | all layers | OS layers only (no audit hook) | escaped |")
    print("| --- | --- | --- | --- | --- |")
    failures = 0
    with tempfile.TemporaryDirectory() as d, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        for case in HOSTILE:
            cells, escapes = [], []
            for audit in (True, False):
                fields = dict(hostile_fields(Path(d)), port=listener.getsockname()[1])
                r = run_program(case.code.format(**fields), case.tests, audit=audit, isolation=mode,  # type: ignore[arg-type]
                                **dict(case.limits))
                escaped = contained(Path(d), fields, r, listener, expect=case.expect)
                cells.append(f"{r.reason} ({r.elapsed_s:.2f} s)")
                escapes += [f"{'all layers' if audit else 'OS layers'}: {e}" for e in escaped]
                failures += bool(escaped) if (audit or mode == "namespaces") else 0
                failures += audit and r.reason != case.expect
                Path(fields["escape"]).unlink(missing_ok=True)
            print(f"| {case.name} | {case.expect} | {cells[0]} | {cells[1]} | {'; '.join(escapes) or 'nothing'} |")
    print(f"\n{len(HOSTILE)} programs, {failures} failure(s).")
    return 1 if failures else 0
