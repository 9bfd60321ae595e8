"""Run model-written Python against tests in a sandbox (the code reward is `guidedrl.rewards.code`).

`run_program(code, tests)` runs one program in a separate process (see `runner.py`), layered:

1. OS limits per process (CPU time, address space, file size, process count, open files, no core
   dumps), a wall-clock timeout that kills the whole process tree, a fresh working folder, a
   stripped environment, stdin closed, stdout/stderr to size-limited files.
2. An unprivileged, per-run uid when we are root (so RLIMIT_NPROC is enforced, root-only files stay
   unreadable and the project's files cannot be deleted); in a user namespace (not root), every
   capability is dropped instead. No new privileges (setuid binaries stay powerless).
3. Namespaces where the OS allows them (`isolation="namespaces"`): no network (a fresh network
   namespace with loopback down), a pid namespace (the whole tree dies with its init; other
   processes are invisible), IPC, and a mount namespace in which home folders, the project and
   the virtualenv are covered by empty read-only tmpfs, /tmp and /dev/shm are fresh size-limited
   tmpfs, and /proc shows only the sandbox. Total memory and process count are watched by init.
4. A PEP 578 audit hook in the program's interpreter: file writes only inside its folder, reads
   only there and in the standard library, no sockets (but AF_UNIX inside its folder), no
   exec/spawn, no signals to other processes, no ctypes. Each denial is reported to the parent.

`isolation="basic"` (layers 1, 2, 4) is used where namespaces are unavailable (e.g. a container
without CAP_SYS_ADMIN); it is weaker: see docs/security.md, which also lists what no layer stops.

Reasons: ok, timeout, cpu_limit, memory_limit, file_size_limit, process_limit, forbidden_access,
network, killed, test_failed, syntax_error, error. Score: 1.0 when every test passes, else 0.0;
with `partial=True`, the fraction of top-level `assert` statements that pass (a violation or a
limit still scores 0). A program passes only if the runner reached the end of the tests and
reported so with the job's nonce: exiting early (`sys.exit(0)`, `os._exit(0)`) is not a pass.

    python -m guidedrl.sandbox --selftest [--isolation basic]   # the hostile suite, as a table
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample

RUNNER = Path(__file__).with_name("runner.py")
Isolation = Literal["auto", "namespaces", "basic"]
REASONS = ("ok", "timeout", "cpu_limit", "memory_limit", "file_size_limit", "process_limit",
           "forbidden_access", "network", "killed", "test_failed", "syntax_error", "error")
SETUP_S = 20.0  # the runner must start the program within this (interpreter start + namespaces)
UID_BASE = 1_600_000  # sandbox uids: UID_BASE + 64 * (pid % 4096) + slot; unused by real accounts
_SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys", "/tmp", "/var", "/run")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not something the program did)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run."""

    timeout_s: float = 5.0
    """Wall clock from the program's start; the whole process tree is killed after it."""
    cpu_s: int = 5
    """CPU seconds per process (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS) and, with namespaces, resident memory of all together."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), stdout and stderr included."""
    nproc: int = 32
    """Processes and threads (RLIMIT_NPROC, per sandbox uid)."""
    disk_mb: int = 64
    """Size of the fresh /tmp (holding the working folder) and /dev/shm, with namespaces."""
    nofile: int = 256
    """Open file descriptors (RLIMIT_NOFILE)."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "nproc", "disk_mb", "nofile"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"code reward: `{name}` must be a positive number, got {value!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"code reward: `memory_mb` must be >= 64 (the interpreter needs it), got {self.memory_mb}")


@dataclass
class RunResult:
    """What happened to one program."""

    ok: bool
    """Every test passed (or, without tests, the program ran to its end)."""
    reason: str
    """One of REASONS."""
    stdout: str
    stderr: str
    returncode: int | None
    """The program's exit code, minus the signal number if a signal killed it, None on a timeout."""
    detail: str = ""
    passed: int = 0
    """Top-level `assert` statements that passed (all or none unless `partial`)."""
    total: int = 0
    elapsed_s: float = 0.0
    isolation: str = ""

    def score(self, partial: bool = False) -> float:
        """1.0 if ok; with `partial`, passed/total for failed tests; 0.0 otherwise."""
        if self.ok:
            return 1.0
        if partial and self.reason == "test_failed" and self.total:
            return self.passed / self.total
        return 0.0


# ----------------------------------------------------------------------------- environment facts


def _protected(path: str) -> bool:
    """Whether `path` is `/` or a system folder, which must never be hidden."""
    return path == "/" or any(path == s or path.startswith(s + "/") for s in _SYSTEM)


def default_hide(extra: tuple[str, ...] = ()) -> list[str]:
    """Folders covered by an empty tmpfs in the sandbox: home folders, the working folder of this
    process, the guidedrl checkout and the virtualenv (never a system folder such as /usr)."""
    cands = ["/root", "/home", os.getcwd(), str(Path(__file__).resolve().parents[2]), *extra]
    if sys.prefix != sys.base_prefix:
        cands.append(sys.prefix)
    out = []
    for c in cands:
        real = os.path.realpath(c)
        if os.path.lexists(real) and not _protected(real) and real not in out:
            out.append(real)
    return out


def _read_roots(extra: tuple[str, ...] = ()) -> list[str]:
    """What the program may read besides its folder: the standard library (and `extra`)."""
    roots = [sysconfig.get_paths()["stdlib"], *extra]
    return [os.path.realpath(r) for r in roots]


def _world_readable(path: str) -> bool:
    """Whether any user can reach `path` (every ancestor searchable by others)."""
    p = Path(path)
    return all(os.stat(q).st_mode & 0o001 for q in [p, *p.parents])


_MODE: dict[str, str] = {}
_MODE_LOCK = threading.Lock()


def isolation_mode(requested: Isolation = "auto") -> str:
    """`namespaces` or `basic`. `auto` tries namespaces once per process and falls back with a warning."""
    if requested not in ("auto", "namespaces", "basic"):
        raise ConfigError(f"code reward: `isolation` must be auto, namespaces or basic, got {requested!r}")
    if requested != "auto":
        return requested
    with _MODE_LOCK:
        if "auto" not in _MODE:
            try:
                # a generous clock: a busy machine must not pass for an OS without namespaces
                probe = run_program("print('ok')", timeout_s=60, isolation="namespaces")
                why = "" if probe.ok and probe.stdout.strip() == "ok" else f"{probe.reason}: {probe.detail}"
            except SandboxError as e:
                why = str(e)
            _MODE["auto"] = "basic" if why else "namespaces"
            if why:
                warnings.warn(f"code sandbox: namespaces unavailable ({why}); using the weaker `basic` "
                              "isolation (see docs/security.md)", RuntimeWarning, stacklevel=2)
        return _MODE["auto"]


class _Uids:
    """Per-run uids when we are root, so that concurrent runs don't share a process count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: set[int] = set()
        self.next = -1

    def lease(self) -> int | None:
        if os.geteuid() != 0:
            return None
        with self.lock:
            base = UID_BASE + 64 * (os.getpid() % 4096)
            for _ in range(64):  # round robin: a uid is reused as late as possible
                self.next = (self.next + 1) % 64
                if base + self.next not in self.used:
                    self.used.add(base + self.next)
                    return base + self.next
            raise RuntimeError("more than 64 concurrent sandboxed programs in one process")

    def release(self, uid: int | None) -> None:
        with self.lock:
            self.used.discard(uid)  # type: ignore[arg-type]


_UIDS = _Uids()


# ----------------------------------------------------------------------------- run one program


def run_program(
    code: str,
    tests: str | None = None,
    *,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_mb: int = 16,
    nproc: int = 32,
    disk_mb: int = 64,
    isolation: Isolation = "auto",
    audit: bool = True,
    partial: bool = False,
    hide: tuple[str, ...] = (),
    allow_read: tuple[str, ...] = (),
    max_output: int = 65536,
) -> RunResult:
    """Run `code`, then `tests` (Python source, usually asserts) in the same namespace, sandboxed.

    Never raises for anything the program does; the outcome is in the result's `reason`.
    `audit=False` leaves out the audit hook (to test the OS layers alone). `hide` and
    `allow_read` add folders to hide (namespaces) or to allow reading (hook).
    """
    limits = Limits(timeout_s, math.ceil(cpu_s), memory_mb, file_mb, nproc, disk_mb)
    mode = isolation_mode(isolation)
    uid = _UIDS.lease()
    try:
        base = tempfile.gettempdir()
        if mode == "basic" and uid is not None and not _world_readable(base):
            base = "/tmp"  # the sandbox uid must be able to reach its folder
        with tempfile.TemporaryDirectory(prefix="guidedrl-sbx-", dir=base) as tmp:
            job = {
                "code": code, "tests": tests, "nonce": secrets.token_hex(16), "isolation": mode,
                "uid": uid, "gid": uid, "workdir": os.path.join(tmp, "work"), "audit": audit, "partial": partial,
                "limits": {k: getattr(limits, k) for k in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "nproc", "disk_mb", "nofile")},
                "parent": os.getpid(),
                "hide": default_hide(hide), "expose": [os.path.realpath(sys.base_prefix)],
                "read_roots": _read_roots(allow_read),
                "preload": mode == "basic" and uid is not None and not _world_readable(_read_roots()[0]),
            }
            return _run(job, tmp, limits, max_output)
    finally:
        _UIDS.release(uid)


def _spawn(job: dict[str, Any], tmp: str) -> tuple[subprocess.Popen, int, int]:
    """Start the runner; returns (process, status pipe, report pipe) read ends."""
    if job["isolation"] == "basic":
        os.mkdir(job["workdir"], 0o700)  # the runner chowns it to the sandbox uid
        os.chmod(tmp, 0o711)  # traversable, not listable, by the sandbox uid
    st_r, st_w = os.pipe()
    rep_r, rep_w = os.pipe()
    job.update(status_fd=st_w, report_fd=rep_w)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MALLOC_ARENA_MAX": "2"}  # arenas eat RLIMIT_AS
    with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(RUNNER)], stdin=subprocess.PIPE, stdout=out, stderr=err,
            pass_fds=(st_w, rep_w), cwd=tmp, env=env, start_new_session=True,
        )
    os.close(st_w)
    os.close(rep_w)
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the runner died at once; its status pipe tells why
    return proc, st_r, rep_r


def _stop(proc: subprocess.Popen, job: dict[str, Any]) -> None:
    """On the deadline. With namespaces, kill the runner's process group: init dies, and with it
    every process in its pid namespace. In basic isolation, ask init (SIGTERM) to kill and reap
    its descendants, which it can find since it is their subreaper; `_kill_tree` follows if it can't."""
    if job["isolation"] == "namespaces":
        _kill_tree(proc, job)
    else:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _kill_tree(proc: subprocess.Popen, job: dict[str, Any]) -> None:
    """Kill the runner's process group; in basic isolation also every process of the sandbox uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if job["isolation"] == "basic" and job["uid"] is not None:
        for _ in range(10):  # RLIMIT_NPROC bounds how many there can be; repeat in case some forked meanwhile
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(f"/proc/{p}") == job["uid"]]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _owner(path: str) -> int | None:
    """The uid owning `path` (a /proc entry), None if it is gone."""
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _collect(proc: subprocess.Popen, st_r: int, rep_r: int, job: dict[str, Any], timeout_s: float
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool, float]:
    """Read both pipes until init exits or the deadline; kill on the deadline.
    Returns (status records, report records, timed out, seconds since the program started)."""
    bufs = {st_r: bytearray(), rep_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    t0 = time.monotonic()
    started, deadline, timed_out, killed = None, t0 + SETUP_S, False, False
    while st_r in sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            if killed:
                _kill_tree(proc, job)
                break  # something still holds the pipe after the kill: stop waiting
            timed_out, killed = started is not None, True
            _stop(proc, job)
            deadline = now + 3.0
        for key, _ in sel.select(timeout=max(0.0, deadline - now)):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
            elif len(bufs[key.fd]) < 2**20:  # a program flooding the report pipe gets ignored
                bufs[key.fd] += data
        if started is None and b'"kind": "started"' in bufs[st_r]:
            started = time.monotonic()
            deadline = started + timeout_s + 1.0  # init enforces timeout_s; this is the backstop
    end = time.monotonic() + 0.2  # the report pipe closes with the sandbox; don't wait on stragglers
    while rep_r in sel.get_map() and time.monotonic() < end:
        for key, _ in sel.select(timeout=0.05):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
            elif len(bufs[key.fd]) < 2**20:
                bufs[key.fd] += data
    sel.close()
    os.close(st_r)
    os.close(rep_r)
    elapsed = time.monotonic() - (started or t0)
    return _records(bufs[st_r]), _records(bufs[rep_r]), timed_out, elapsed


def _records(buf: bytes) -> list[dict[str, Any]]:
    """The JSON-object lines of a pipe's bytes; anything else (a program's garbage) is skipped."""
    out = []
    for line in bytes(buf).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_head(path: str, limit: int) -> str:
    """The first `limit` bytes of a captured stream, decoded, marked if truncated."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def _run(job: dict[str, Any], tmp: str, limits: Limits, max_output: int) -> RunResult:
    """Spawn the runner, collect its records and outputs, and turn them into a result."""
    proc, st_r, rep_r = _spawn(job, tmp)
    try:
        status, reports, timed_out, elapsed = _collect(proc, st_r, rep_r, job, limits.timeout_s)
    finally:
        if proc.poll() is None:
            _kill_tree(proc, job)
        proc.wait()
    setup = next((r for r in status if r.get("kind") == "setup_error"), None)
    if setup is not None:  # not the program's doing: fail loudly rather than score 0
        raise SandboxError(f"code sandbox ({job['isolation']} isolation) could not be set up: {setup.get('error')}")
    exit_rec = next((r for r in status if r.get("kind") == "exit"), None)
    reason, detail, passed, total = _verdict(reports, exit_rec, timed_out, job["nonce"], limits)
    returncode = None
    if exit_rec is not None:
        returncode = exit_rec["code"] if exit_rec.get("signal") is None else -int(exit_rec["signal"])
    return RunResult(
        ok=reason == "ok", reason=reason, detail=detail, passed=passed, total=total,
        stdout=_read_head(os.path.join(tmp, "stdout"), max_output),
        stderr=_read_head(os.path.join(tmp, "stderr"), max_output),
        returncode=returncode, elapsed_s=round(elapsed, 3), isolation=job["isolation"],
    )


def _verdict(reports: list[dict[str, Any]], exit_rec: dict[str, Any] | None,
             timed_out: bool, nonce: str, limits: Limits) -> tuple[str, str, int, int]:
    """(reason, detail, passed, total), most telling cause first: a forbidden act, then a limit,
    then how the program ended. Only the trusted status pipe and the nonce can make a pass."""
    violations = [r for r in reports if r.get("kind") == "violation"]
    hard = next((v for v in violations if v.get("reason") in ("forbidden_access", "network")), None)
    if hard is not None:
        return hard["reason"], f"{hard.get('event')}: {hard.get('detail')}", 0, 0
    exceeded = exit_rec.get("exceeded") if exit_rec is not None else None
    if exceeded == "memory":
        return "memory_limit", f"the program's processes used more than {limits.memory_mb} MB together", 0, 0
    if exceeded == "disk":
        return "file_size_limit", f"the program's files took more than {limits.disk_mb} MB", 0, 0
    if any(v.get("reason") == "process_limit" for v in violations) or (
            exit_rec is not None and (exit_rec.get("peak_tasks") or 0) >= limits.nproc):
        return "process_limit", f"more than {limits.nproc} processes/threads", 0, 0
    if timed_out or exceeded == "time":
        return "timeout", f"still running after {limits.timeout_s} s", 0, 0
    if exit_rec is None:
        return "error", "the sandbox ended without an exit record", 0, 0
    sig = exit_rec.get("signal")
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and (exit_rec.get("cpu_s") or 0) >= limits.cpu_s):
            return "cpu_limit", f"used {limits.cpu_s} s of CPU", 0, 0
        if sig == signal.SIGXFSZ:
            return "file_size_limit", f"wrote a file larger than {limits.file_mb} MB", 0, 0
        return "killed", f"killed by {signal.Signals(sig).name}", 0, 0
    ok = next((r for r in reports if r.get("kind") == "ok" and r.get("nonce") == nonce), None)
    if exit_rec.get("code") == 0 and ok is not None:
        passed, total = int(ok.get("passed", 0)), int(ok.get("total", 0))
        if passed < total:
            return "test_failed", f"{passed} of {total} asserts passed", passed, total
        return "ok", "", passed, total
    result = next((r for r in reversed(reports) if r.get("kind") == "result"), None)
    if result is not None and result.get("reason") in REASONS:
        return result["reason"], str(result.get("detail", "")), 0, 0
    return "error", f"the program ended (exit code {exit_rec.get('code')}) before the tests finished", 0, 0
