"""The in-sandbox side of `guidedrl.rewards.code`: run one untrusted program against its tests.

Started as `python -I -S -B runner.py` (standard library only) with a JSON job on stdin.
outer: the process `run_program` started (a new session); with namespaces it unshares mount, net,
pid, IPC (and user, when not root) namespaces and forks init, pid 1 of the new pid namespace.
init: builds the file-system view, forks the worker, reaps orphans, watches total memory and task
count, writes the trusted exit record on the status pipe; when it exits the kernel kills whatever
is left in the namespace. worker: rlimits, unprivileged uid (or no capabilities), audit hook, then
exec() of the program and the tests. The report pipe is shared with the program (it can add
records, never remove them); a pass needs the final record with the job's nonce, written only
after the tests ran to the end. docs/security.md says what each layer stops and what it does not.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any, Callable

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
SETUP_FAILED = 97  # exit code of a runner whose isolation could not be set up
FORBIDDEN, NETWORK = "forbidden_access", "network"
SAMPLE_S = 0.02  # how often init samples memory and process count


def _libc() -> Any:
    """The C library, for the system calls `os` lacks (unshare, mount, prctl, capset)."""
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    """Raise OSError with errno for a failed libc call (ctypes returns -1 silently)."""
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc: Any, src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); None arguments are passed as NULL."""
    b = [None if x is None else os.fsencode(x) for x in (src, target, fstype, data)]
    _check(libc.mount(b[0], b[1], b[2], ctypes.c_ulong(flags), b[3]), f"mount {target}")


def _write(fd: int, record: dict[str, Any]) -> None:
    """One JSON line (< PIPE_BUF, so concurrent writers never interleave)."""
    data = (json.dumps(record, default=str)[:4000] + "\n").encode()
    try:
        os.write(fd, data)
    except OSError:
        pass


# ----------------------------------------------------------------------------- namespaces (outer, init)


def _enter_namespaces(libc: Any) -> None:
    """New mount, network, pid and IPC namespaces; inside a new user namespace when not root."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")
    if uid != 0:  # map ourselves to root inside, so we may mount; capabilities are dropped later
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _under(path: str, roots: list[str]) -> bool:
    """Whether `path` is one of `roots` or lies below one."""
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _build_view(libc: Any, job: dict[str, Any]) -> None:
    """The program's file-system view: hidden folders become empty read-only tmpfs (re-exposing the
    Python installation read-only where it lies inside one), fresh /tmp and /dev/shm, own /proc."""
    disk = f"size={job['limits']['disk_mb']}m"
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    hide = [h for h in sorted(set(job["hide"]), key=len) if os.path.lexists(h) and not _under(h, ["/tmp"])]
    hide = [h for i, h in enumerate(hide) if not _under(h, hide[:i])]  # a parent hides its children
    expose = [e for e in job["expose"] if os.path.isdir(e) and _under(e, hide)]
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, disk + ",mode=1777")
    stages = []
    for i, e in enumerate(expose):  # park the exposed trees before covering their parents
        stage = f"/tmp/.expose-{i}"
        os.mkdir(stage)
        _mount(libc, e, stage, None, MS_BIND | MS_REC)
        stages.append(stage)
    for h in hide:
        if os.path.isdir(h) and not os.path.islink(h):
            _mount(libc, "tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        else:
            _mount(libc, "/dev/null", h, None, MS_BIND)
    for e, stage in zip(expose, stages):
        os.makedirs(e, exist_ok=True)
        _mount(libc, stage, e, None, MS_MOVE)
        _mount(libc, None, e, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.rmdir(stage)
    for h in hide:
        if os.path.isdir(h) and not os.path.islink(h):
            _mount(libc, None, h, "tmpfs", MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, disk + ",mode=1777")
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


# ----------------------------------------------------------------------------- supervision (init)


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, threads, resident pages) of every process in our /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # fields 3.. of proc(5)
                table[int(name)] = (int(fields[1]), int(fields[17]), int(fields[21]))
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return table


def _sandbox_pids(job: dict[str, Any], table: dict[int, tuple[int, int, int]]) -> list[int]:
    """Every process of the sandbox but init: in a pid namespace, all we see; otherwise our
    descendants (init is their child subreaper, so orphans stay in our tree)."""
    me = os.getpid()
    if job["isolation"] == "namespaces":
        return [p for p in table if p != me]
    out, todo = [], [me]
    while todo:
        parent = todo.pop()
        kids = [p for p, row in table.items() if row[0] == parent]
        out += kids
        todo += kids
    return out


def _sample(job: dict[str, Any]) -> tuple[int, int]:
    """(total resident bytes, tasks) of the sandbox; threads count, as RLIMIT_NPROC counts them."""
    table = _proc_table()
    pids = _sandbox_pids(job, table)
    return sum(table[p][2] for p in pids) * os.sysconf("SC_PAGE_SIZE"), sum(table[p][1] for p in pids)


def _kill_all(job: dict[str, Any]) -> None:
    """Kill every process of the sandbox except init itself."""
    pids = [-1] if job["isolation"] == "namespaces" else _sandbox_pids(job, _proc_table())
    for pid in pids:  # kill(-1) from the init of a pid namespace: everything inside it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reap_all(job: dict[str, Any], limit_s: float = 2.0) -> None:
    """Kill and reap until no child is left: zombies would still count against RLIMIT_NPROC."""
    end, last_kill = time.monotonic() + limit_s, 0.0
    while time.monotonic() < end:
        if time.monotonic() - last_kill > 0.05:
            _kill_all(job)
            last_kill = time.monotonic()
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.002)


def _disk_usage(path: str) -> int:
    """Bytes allocated under `path` (symlinks not followed)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _supervise(job: dict[str, Any], worker: int, status_fd: int, stop: list[int]) -> None:
    """Reap, watch memory, task count, disk (basic isolation: the folder is on the host's disk)
    and the wall clock until the worker exits; then kill the rest and write the exit record.
    `stop` becomes non-empty on SIGTERM (the parent's deadline, in basic isolation)."""
    lim = job["limits"]
    deadline = time.monotonic() + lim["timeout_s"]  # enforced here too: it holds if the trainer dies
    peak_tasks, exceeded, status, ru, rounds = 0, None, 0, None, 0
    delay = 0.001  # short programs end within milliseconds: poll fast at first
    while True:
        try:
            pid, st, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == worker:
            status, ru = st, usage
            break
        if pid:
            continue  # an orphan reaped
        rss, tasks = _sample(job)
        peak_tasks, rounds = max(peak_tasks, tasks), rounds + 1
        if exceeded is None:
            if rss > lim["memory_mb"] * 2**20:
                exceeded = "memory"
            elif job["isolation"] == "basic" and rounds % 2 == 0 and _disk_usage(job["workdir"]) > lim["disk_mb"] * 2**20:
                exceeded = "disk"
            elif stop or time.monotonic() > deadline:
                exceeded = "time"
        if exceeded is not None:
            _kill_all(job)
        time.sleep(delay)
        delay = min(2 * delay, SAMPLE_S)
    _reap_all(job)
    _write(status_fd, {
        "kind": "exit",
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "cpu_s": (ru.ru_utime + ru.ru_stime) if ru else None,
        "peak_tasks": peak_tasks,
        "exceeded": exceeded,
    })


def _init(job: dict[str, Any], status_fd: int, report_fd: int) -> None:
    """The sandbox's init: set up the view and the work folder, fork the worker, supervise it. Exits."""
    libc = _libc()
    try:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # dies with its parent
        if job["isolation"] == "namespaces":
            _build_view(libc, job)
        else:  # orphans are re-parented to us, not to the system's init: we can kill and reap them
            _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
        os.makedirs(job["workdir"], mode=0o700, exist_ok=True)
        if job["uid"] is not None:
            os.chown(job["workdir"], job["uid"], job["gid"])
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # a same-uid program may not ptrace us
    except OSError as e:
        _write(status_fd, {"kind": "setup_error", "error": str(e)})
        os._exit(SETUP_FAILED)
    del libc
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    worker = os.fork()
    if worker == 0:
        os.close(status_fd)
        _worker(job, report_fd)  # never returns
    os.close(report_fd)
    _write(status_fd, {"kind": "started"})
    _supervise(job, worker, status_fd, stop)
    os._exit(0)


# ----------------------------------------------------------------------------- worker: limits and privileges


def _user_tasks(uid: int) -> int:
    """Tasks (processes and threads) our uid already has: with no uid of its own, the sandbox's
    RLIMIT_NPROC must leave room for them, since the kernel counts them all."""
    def owner(pid: int) -> int | None:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None
    return sum(row[1] for pid, row in _proc_table().items() if owner(pid) == uid)


def _set_limits(job: dict[str, Any]) -> None:
    """The rlimits of the worker (inherited by everything it forks)."""
    lim, mb, cpu = job["limits"], 2**20, int(job["limits"]["cpu_s"])
    nproc = lim["nproc"] + (_user_tasks(os.getuid()) if job["uid"] is None and os.geteuid() != 0 else 0)
    for res, soft, hard in (  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
        (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, lim["memory_mb"] * mb, lim["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, lim["file_mb"] * mb, lim["file_mb"] * mb), (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]), (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the default kills: unambiguous
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # init's handler is not the program's


def _drop_privileges(job: dict[str, Any]) -> None:
    """Become the sandbox uid (root), or drop every capability (user namespace); no new privileges."""
    libc = _libc()
    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["gid"], job["gid"], job["gid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # so it may read its own /proc/self/fd (init stays 0)
    elif job["isolation"] == "namespaces" and os.geteuid() == 0:  # root of our own user namespace
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        _check(libc.prctl(PR_SET_SECUREBITS, 0x2F, 0, 0, 0), "securebits")  # noroot, no setuid fixup, locked
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable = 0 (two 32-bit words)
        _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


# ----------------------------------------------------------------------------- worker: run the program


def _classify(exc: BaseException, phase: str) -> str:
    """The reason an uncaught exception stands for."""
    if isinstance(exc, AssertionError):
        return "test_failed" if phase == "tests" else "error"
    if isinstance(exc, MemoryError) or isinstance(exc, PermissionError):
        return "memory_limit" if isinstance(exc, MemoryError) else FORBIDDEN
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return "process_limit"
    if isinstance(exc, ConnectionError) or type(exc).__name__ in ("gaierror", "herror"):
        return NETWORK
    if isinstance(exc, OSError):
        if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
            return "file_size_limit"
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL):
            return NETWORK
        if exc.errno == errno.EAGAIN and any(f.f_code.co_name == "fork" for f, _ in traceback.walk_tb(exc.__traceback__)):
            return "process_limit"  # raised through _guard_fork's wrapper (no source lookup: the hook)
    return "error"


def _guard_fork(report: Callable[[dict[str, Any]], None]) -> None:
    """Report hitting the process limit even when the program catches the error."""
    real = os.fork

    def fork() -> int:
        try:
            return real()
        except BlockingIOError:
            report({"kind": "violation", "reason": "process_limit", "event": "os.fork", "detail": "EAGAIN"})
            raise

    os.fork = fork
    sys.modules["posix"].fork = fork


def _run_tests(tests: str, glb: dict[str, Any], partial: bool) -> tuple[int, int]:
    """Run the tests in the program's namespace. All at once, or (partial) one top-level statement
    at a time counting the asserts that pass. Returns (passed, total) asserts."""
    tree = ast.parse(tests, "<tests>")
    total = sum(isinstance(s, ast.Assert) for s in tree.body)
    if not partial:
        exec(compile(tree, "<tests>", "exec"), glb)
        return total, total
    passed = 0
    for stmt in tree.body:
        code = compile(ast.Module(body=[stmt], type_ignores=[]), "<tests>", "exec")
        try:
            exec(code, glb)
        except AssertionError:
            if not isinstance(stmt, ast.Assert):
                raise
            continue
        passed += isinstance(stmt, ast.Assert)
    return passed, total


# Standard-library modules safe to import as root (no side effects at import). In basic isolation
# with Python under a private folder (e.g. /root/.pyenv) the sandbox uid cannot read the standard
# library, so the ones the program and tests import are imported before dropping privileges.
PRELOADABLE = frozenset("""abc array ast base64 binascii bisect bz2 calendar cmath codecs collections
    contextlib copy csv dataclasses datetime decimal difflib dis enum fnmatch fractions functools glob gzip
    hashlib heapq inspect io itertools json locale lzma math numbers operator pathlib pickle pprint queue
    random re secrets select selectors shlex shutil signal socket sqlite3 statistics string struct
    subprocess tempfile textwrap threading time tokenize traceback typing unicodedata uuid warnings weakref
    zlib""".split())
LAZY = {"socket": ("encodings.idna",), "datetime": ("_strptime",), "time": ("_strptime",)}  # imported on use


def _preload(*sources: str) -> None:
    """Import the preloadable modules that `sources` import (their top-level packages too)."""
    for src in sources:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                if name.split(".")[0] in PRELOADABLE:
                    for module in (name, *LAZY.get(name, ())):
                        try:
                            __import__(module)
                        except ImportError:
                            pass


def _worker(job: dict[str, Any], report_fd: int) -> None:
    """Limits, privileges, hook; then the program and its tests. Exits, never returns."""
    nonce, code, tests, partial = job["nonce"], job["code"], job["tests"], job["partial"]
    out, err, exit_ = sys.stdout, sys.stderr, os._exit
    phase = "setup"

    def report(record: dict[str, Any]) -> None:
        _write(report_fd, record)

    try:
        os.chdir(job["workdir"])
        if job["preload"]:
            _preload(code, tests or "")
        _set_limits(job)
        _drop_privileges(job)
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with init; a uid change resets it
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": job["workdir"], "TMPDIR": job["workdir"]})
        for name, text in (("<solution>", code), ("<tests>", tests or "")):
            linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        _guard_fork(report)
        if job["audit"]:
            sys.addaudithook(hook_module.make_hook(os.path.realpath(job["workdir"]), job["read_roots"], report_fd))
        del job
        phase = "compile"
        program = compile(code, "<solution>", "exec")
        glb: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        phase = "program"
        exec(program, glb)
        phase = "tests"
        passed, total = _run_tests(tests, glb, partial) if tests else (0, 0)
    except BaseException as e:  # noqa: BLE001 - anything the program raises is a result
        reason = "syntax_error" if phase == "compile" and isinstance(e, SyntaxError) else _classify(e, phase)
        if isinstance(e, SystemExit):
            detail = f"exited ({e.code!r}) before the tests finished"
        else:
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            _print_traceback(e)
        passed = total = -1
        report({"kind": "result", "reason": reason, "phase": phase, "detail": detail[:1000]})
    for stream in (out, err):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have closed them
            pass
    if passed < 0:
        exit_(1)
    report({"kind": "ok", "nonce": nonce, "passed": passed, "total": total})
    exit_(0)


def _print_traceback(e: BaseException) -> None:
    """The traceback of the program's own frames only: looking up the runner's source lines would
    trip the audit hook (and the runner's frames say nothing about the program)."""
    frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__), lookup_lines=False)
    mine = traceback.StackSummary.from_list([f for f in frames if f.filename in ("<solution>", "<tests>")])
    text = "Traceback (most recent call last):\n" + "".join(mine.format()) if mine else ""
    text += "".join(traceback.format_exception_only(type(e), e))
    try:
        sys.__stderr__.write(text)
    except Exception:  # noqa: BLE001 - stderr may be closed or full
        pass


# ----------------------------------------------------------------------------- entry point


def _load_hook_module() -> Any:
    """hook.py from our folder (-I keeps it off sys.path); loaded before the folder is hidden."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_hook", os.path.join(os.path.dirname(__file__), "hook.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook_module: Any = None


def main() -> None:
    """Entry point: read the job, then enter namespaces (and fork init) or, in basic isolation, be init."""
    global hook_module
    hook_module = _load_hook_module()
    job = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    status_fd, report_fd = job["status_fd"], job["report_fd"]
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the sandbox dies with the trainer
    if os.getppid() != job["parent"]:
        os._exit(SETUP_FAILED)  # the trainer died before that took effect
    if job["isolation"] != "namespaces":
        _init(job, status_fd, report_fd)
    try:
        _enter_namespaces(_libc())
    except OSError as e:
        _write(status_fd, {"kind": "setup_error", "error": str(e)})
        os._exit(SETUP_FAILED)
    pid = os.fork()  # the first child is pid 1 of the new pid namespace
    if pid == 0:
        _init(job, status_fd, report_fd)
    os.close(status_fd)
    os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
