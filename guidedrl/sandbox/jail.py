"""Run one command in a bubblewrap jail under rlimits: the isolation of the code sandbox.

The jail (`bwrap`, Debian's `bubblewrap`; `scripts/setup.sh` installs it) is a fresh tmpfs root
that binds read-only only `/usr` (with the `/bin`, `/lib*` links) and the sandbox interpreter's
installation; a private size-limited `/tmp` (the working folder) and `/dev/shm`; a new `/proc`
and a minimal `/dev`; the root, `/dev` and every other mount read-only. New user, pid, network,
IPC, UTS and cgroup namespaces (no network at all, only its own processes visible), uid 65534
inside, no capabilities, no further user namespaces, a new session, killed with its parent.
`prlimit` sets the rlimits (CPU seconds, address space, file size, processes, open files, no core
dumps). As root, each jail runs under a uid of its own (leased), so that `RLIMIT_NPROC` counts only
its processes: the kernel does not apply it to uid 0.

Where bubblewrap cannot run, `isolation="auto"` falls back, with a warning and the label
`ISOLATION_WEAK` on every result, to the same rlimits without the jail (no file-system, network or
process isolation); `isolation="bwrap"` refuses to. docs/security.md says what each stops.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, fields
from typing import Literal

from guidedrl.core.errors import ConfigError

Isolation = Literal["auto", "bwrap", "rlimits"]
ISOLATION_BWRAP = "bwrap"
ISOLATION_WEAK = "rlimits (WEAKER fallback, no bubblewrap jail: no file-system, network or process isolation)"
STARTUP_S = 2.0  # allowance on top of `timeout_s` for starting the jail and the interpreter (a busy machine)
UID_BASE = 1_600_000  # jail uids as root: UID_BASE + 64 * (pid % 4096) + slot; unused by real accounts
SANDBOX_UID = 65534  # the uid inside the jail (nobody)
BOX = "/box"  # where the jail sees the files of a run (read-only)
MIN_BWRAP = (0, 8)  # --size (tmpfs quotas) and --disable-userns; Debian 12 has 0.8.0, Ubuntu 24.04 0.9.0


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not something the program did)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one jailed process (and everything it starts)."""

    timeout_s: float = 5.0
    """Wall clock of one run (plus STARTUP_S for the jail to start); then the whole jail is killed."""
    cpu_s: int = 5
    """CPU seconds per process (RLIMIT_CPU: SIGXCPU, SIGKILL a second later)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS)."""
    file_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), stdout, stderr and results included."""
    nproc: int = 16
    """Processes and threads of the jail, the jail's own two included (RLIMIT_NPROC)."""
    disk_mb: int = 64
    """Size of the jail's /tmp (its working folder) and, separately, of its /dev/shm (tmpfs)."""
    nofile: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"code reward: `{f.name}` must be a positive number, got {value!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"code reward: `memory_mb` must be >= 64 (the interpreter needs it), "
                              f"got {self.memory_mb}")
        if self.nproc < 4:
            raise ConfigError(f"code reward: `nproc` must be >= 4 (the jail itself takes 2), got {self.nproc}")


@dataclass
class Exit:
    """What the parent saw of one jailed process. `code`, `timed_out` and `seconds` are the
    parent's own observations; the streams and `report` (the harness's report file) hold whatever
    the program wrote, so they are untrusted."""

    code: int | None
    """Exit code; 128 + N when signal N killed it (as bwrap reports it); None on a timeout."""
    timed_out: bool
    stdout: bytes
    stderr: bytes
    report: bytes
    seconds: float


# ----------------------------------------------------------------------------- the interpreter


def _reachable(path: str, mode: int = 0o004) -> bool:
    """Whether any user has `mode` (other-bits) on `path` and can search every folder above it."""
    try:
        if os.stat(path).st_mode & mode != mode:
            return False
        folder = os.path.dirname(path)
        while True:
            if not os.stat(folder).st_mode & 0o001:
                return False
            if folder == "/":
                return True
            folder = os.path.dirname(folder)
    except OSError:
        return False


@dataclass(frozen=True)
class Python:
    """The interpreter the jail runs, and what of its installation the jail binds."""

    exe: str
    prefix: str
    """Bound read-only where it is not under /usr."""
    hidden: str | None
    """Its own site-packages, covered by an empty read-only tmpfs (standard library only)."""


@functools.cache
def sandbox_python() -> Python:
    """The trainer's own base interpreter (not the virtualenv), or, as root with that interpreter
    where other users cannot read it (e.g. under /root: the jail runs as another uid), /usr/bin/python3."""
    exe, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if os.geteuid() == 0 and not (_reachable(exe, 0o005) and _reachable(sysconfig.get_paths()["stdlib"], 0o005)):
        if not _reachable("/usr/bin/python3", 0o005):
            raise SandboxError(f"code sandbox: the interpreter {exe} is not readable by other users and there is "
                               "no /usr/bin/python3; install python3 (apt-get install python3) or Python where "
                               "others can read it")
        exe, prefix = os.path.realpath("/usr/bin/python3"), "/usr"
    site = os.path.realpath(sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix}))
    return Python(exe, prefix, site if site.startswith(prefix + "/") and os.path.isdir(site) else None)


# ----------------------------------------------------------------------------- command lines


def _prlimit(limits: Limits, extra_tasks: int = 0) -> list[str]:
    """`prlimit` with the rlimits of a run (it sets them on itself, then execs the rest)."""
    mb, cpu = 2**20, int(limits.cpu_s)
    return ["prlimit", f"--cpu={cpu}:{cpu + 1}", f"--as={limits.memory_mb * mb}", f"--fsize={limits.file_mb * mb}",
            f"--nproc={limits.nproc + extra_tasks}", f"--nofile={limits.nofile}", "--core=0", "--"]


def _bwrap(limits: Limits, python: Python, files: dict[str, int], status_fd: int) -> list[str]:
    """The bubblewrap command line: the jail described in the module docstring."""
    disk = str(limits.disk_mb * 2**20)
    argv = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--json-status-fd", str(status_fd), "--clearenv", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged /usr: links; else binds
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if not (python.prefix == "/usr" or python.prefix.startswith("/usr/")):
        argv += ["--ro-bind", python.prefix, python.prefix]
    if python.hidden is not None:
        argv += ["--tmpfs", python.hidden, "--remount-ro", python.hidden]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", disk, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--size", disk, "--tmpfs", "/tmp", "--dir", BOX]
    for name, fd in files.items():
        argv += ["--ro-bind-data", str(fd), f"{BOX}/{name}"]
    for var, value in _env("/tmp").items():
        argv += ["--setenv", var, value]
    return argv + ["--remount-ro", "/", "--chdir", "/tmp"]


def _env(home: str) -> dict[str, str]:
    """The program's whole environment."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            "MALLOC_ARENA_MAX": "2"}  # glibc's per-thread arenas would eat RLIMIT_AS


# ----------------------------------------------------------------------------- uids and tasks


class _Uids:
    """A uid per concurrent jail when we are root, so that RLIMIT_NPROC (which the kernel does not
    apply to uid 0) counts each jail's processes alone."""

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
            raise SandboxError("more than 64 concurrent sandboxed processes in one process")

    def release(self, uid: int | None) -> None:
        with self.lock:
            self.used.discard(uid)  # type: ignore[arg-type]


_UIDS = _Uids()


def _own_tasks() -> int:
    """Tasks (processes and threads) of our uid: without a uid of its own, the jail's RLIMIT_NPROC
    counts them too, so the limit must leave room for them."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue  # exited meanwhile
    return n


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid` (the fallback's way to end what a program detached)."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


# ----------------------------------------------------------------------------- run


def _memfd(name: str, data: bytes = b"") -> int:
    """An anonymous in-memory file holding `data`, positioned at its start."""
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(fd: int, limit: int) -> bytes:
    """The first `limit` bytes of a memfd."""
    return os.pread(fd, min(os.fstat(fd).st_size, limit), 0)


def run_jailed(argv: list[str], files: dict[str, bytes], stdin: bytes, limits: Limits, isolation: str) -> Exit:
    """Run `argv` (its first item `sandbox_python().exe`, other paths under BOX)
    with `files` readable under BOX and `stdin`, jailed (`isolation` "bwrap") or under rlimits
    alone (the fallback). Never raises for anything the program does; SandboxError if the jail
    could not be set up."""
    uid = _UIDS.lease()
    fds: list[int] = []
    box = None
    try:
        std = [_memfd(name, data) for name, data in (("stdin", stdin), ("stdout", b""), ("stderr", b""),
                                                     ("report", b""), ("status", b""))]
        fds += std
        file_fds = {name: _memfd(name, data) for name, data in files.items()}
        fds += file_fds.values()
        argv = [a.replace("{report}", str(std[3])) for a in argv]
        extra = 0 if uid is not None else _own_tasks()
        if isolation == ISOLATION_BWRAP:
            cmd, cwd, env = _prlimit(limits, extra) + _bwrap(limits, sandbox_python(), file_fds, std[4]) + argv, "/", {}
        else:
            box = tempfile.mkdtemp(prefix="guidedrl-box-")
            cmd, cwd, env = _fallback(box, files, uid, argv, limits, extra)
        exit_ = _wait(cmd, cwd, env, std, (std[3], std[4], *file_fds.values()), limits, uid)
        if isolation == ISOLATION_BWRAP:
            init = _check_status(_read(std[4], 65536), exit_)
            if init is not None:  # bwrap reports the program's exit before its pid 1 has emptied the jail
                _await_exit(init)
        elif uid is not None:
            _kill_uid(uid)
        return exit_
    finally:
        for fd in fds:
            os.close(fd)
        if box is not None:
            shutil.rmtree(box, ignore_errors=True)
        _UIDS.release(uid)


def _fallback(box: str, files: dict[str, bytes], uid: int | None, argv: list[str], limits: Limits,
              extra: int) -> tuple[list[str], str, dict[str, str]]:
    """The weaker fallback: the files in a private host folder, its own uid as root, rlimits."""
    work = os.path.join(box, "work")
    os.mkdir(work)
    for name, data in files.items():
        with open(os.path.join(box, name), "wb") as f:
            f.write(data)
    if uid is not None:
        os.chmod(box, 0o755)
        os.chown(work, uid, uid)
    argv = [a.replace(BOX + "/", box + "/") if a.startswith(BOX + "/") else a for a in argv]
    return _prlimit(limits, extra) + argv, work, _env(work)


def _wait(cmd: list[str], cwd: str, env: dict[str, str], std: list[int], keep: tuple[int, ...], limits: Limits,
          uid: int | None) -> Exit:
    """Start `cmd` (stdin, stdout, stderr, report: `std`; `keep`: the fds it inherits), wait for it
    up to the deadline, kill its session on the deadline."""
    ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=std[0], stdout=std[1], stderr=std[2], pass_fds=keep, cwd=cwd,  # type: ignore
                            env={"PATH": "/usr/bin:/bin", **env}, start_new_session=True, **ids)
    try:  # a pidfd becomes readable when the process ends: no polling (Popen.wait's costs ~20 ms a run)
        pidfd = os.pidfd_open(proc.pid)
        try:
            timed_out = not select.select([pidfd], [], [], limits.timeout_s + STARTUP_S)[0]
        finally:
            os.close(pidfd)
    finally:
        try:  # on the deadline: bwrap, and with it (--die-with-parent, pid 1) its whole jail; else what
            os.killpg(proc.pid, signal.SIGKILL)  # the fallback's program left in its process group
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = time.monotonic() - t0
    code = None if timed_out else (proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)
    cap = limits.file_mb * 2**20
    return Exit(code=code, timed_out=timed_out, stdout=_read(std[1], cap), stderr=_read(std[2], cap),
                report=_read(std[3], cap), seconds=round(seconds, 3))


def _check_status(status: bytes, exit_: Exit) -> int | None:
    """The host pid of the jail's pid 1, from bwrap's own status records (a channel the program
    cannot reach). No exit record without a timeout: the jail never started (SandboxError)."""
    records = []
    for line in status.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    info = next((r for r in records if "child-pid" in r), {})
    if not exit_.timed_out and not any("exit-code" in r for r in records):
        raise SandboxError(f"code sandbox: bubblewrap could not set up the jail (exit code {exit_.code}): "
                           f"{exit_.stderr.decode(errors='replace').strip()[-500:]}")
    pid = info.get("child-pid")
    return pid if type(pid) is int else None


def _await_exit(pid: int, limit_s: float = 10.0) -> None:
    """Wait until the jail's pid 1, killed with bwrap, has exited: the kernel lets it go only once
    every process of its pid namespace is gone, so nothing of the program outlives the run."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return  # exited; its parent (no longer bwrap) has yet to reap it
        except (OSError, IndexError):
            return
        time.sleep(0.005)


# ----------------------------------------------------------------------------- which isolation


_MODE: dict[str, str] = {}
_MODE_LOCK = threading.Lock()


def isolation_mode(requested: str = "auto") -> str:
    """ISOLATION_BWRAP or ISOLATION_WEAK. `auto` checks once per process that bubblewrap runs and
    falls back with a warning; `bwrap` raises SandboxError where it cannot run."""
    if requested not in ("auto", "bwrap", "rlimits"):
        raise ConfigError(f"code reward: `isolation` must be auto, bwrap or rlimits, got {requested!r}")
    if requested == "rlimits":
        return ISOLATION_WEAK
    with _MODE_LOCK:
        if "probe" not in _MODE:
            _MODE["probe"] = _probe()
    why = _MODE["probe"]
    if not why:
        return ISOLATION_BWRAP
    if requested == "bwrap":
        raise SandboxError(f"code sandbox: bubblewrap cannot run here ({why}); install it with scripts/setup.sh")
    with _MODE_LOCK:
        if "warned" not in _MODE:
            _MODE["warned"] = "1"
            warnings.warn(f"code sandbox: bubblewrap cannot run here ({why}); programs run under rlimits alone, "
                          "WITHOUT file-system, network or process isolation (docs/security.md). Install "
                          "bubblewrap (scripts/setup.sh) for untrusted code.", RuntimeWarning, stacklevel=3)
    return ISOLATION_WEAK


def _probe() -> str:
    """Why bubblewrap cannot run a trivial program here; "" if it can."""
    if shutil.which("prlimit") is None:
        return "no `prlimit` (util-linux)"
    if shutil.which("bwrap") is None:
        return "no `bwrap` (Debian: apt-get install bubblewrap)"
    version = (subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.split() or ["?"])[-1]
    if tuple(int(x) if x.isdigit() else 0 for x in version.split(".")[:2]) < MIN_BWRAP:
        return f"bubblewrap {version} is older than {'.'.join(map(str, MIN_BWRAP))} (needs --size, --disable-userns)"
    try:
        exe = sandbox_python().exe
        r = run_jailed([exe, "-I", "-S", "-c", "print('ok')"], {}, b"", Limits(timeout_s=60), ISOLATION_BWRAP)
    except (SandboxError, OSError) as e:
        return str(e)
    return "" if r.code == 0 and r.stdout.strip() == b"ok" else f"exit code {r.code}: {r.stderr[-300:]!r}"
