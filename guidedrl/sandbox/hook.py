"""The audit hook (PEP 578) installed in the sandboxed program's interpreter by `runner.py`.

Standard library only; loaded by the runner from this file before the project folder is hidden.
It is the innermost layer (see docs/security.md): it names the violation precisely and contains
programs where the OS layers are weak (`basic` isolation), but it lives in the program's own
interpreter, so it is not a boundary against a program written to defeat it (for example with
`_posixsubprocess.fork_exec`, which raises no audit event). The OS layers are the boundary.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

FORBIDDEN, NETWORK = "forbidden_access", "network"
_PATH_WRITE = {  # event -> (indices of path arguments that must lie inside the work dir, of their dir_fd)
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)), "shutil.rmtree": ((0,), (1,)), "os.truncate": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.mkfifo": ((0,), ()), "os.mknod": ((0,), ()),
}
_DENY = {"os.exec": FORBIDDEN, "os.posix_spawn": FORBIDDEN, "os.spawn": FORBIDDEN, "os.system": FORBIDDEN,
         "subprocess.Popen": FORBIDDEN, "os.killpg": FORBIDDEN, "socket.getaddrinfo": NETWORK,
         "socket.gethostbyname": NETWORK, "socket.gethostbyname_ex": NETWORK, "socket.gethostbyaddr": NETWORK,
         "socket.getnameinfo": NETWORK, "gc.get_objects": FORBIDDEN, "gc.get_referrers": FORBIDDEN,
         "gc.get_referents": FORBIDDEN}  # gc would reach the hook's closure and rewrite it


def _make_resolve(getcwd: Any, lstat: Any, readlink: Any, fsenc: str) -> tuple[Callable, Callable]:
    """(text, resolve) for the hook: path -> str, and path -> absolute path with symlinks resolved
    (like os.path.realpath; an `entry` keeps its last part unresolved: unlink, rename, symlink)."""
    str_, bytes_, type_, oserror = str, bytes, type, OSError

    def text(p):  # events carry paths already converted by os.fspath: str or bytes
        return p.decode(fsenc, "surrogateescape") if type_(p) is bytes_ else str_(p)

    def resolve(p, base=None, entry=False):
        p = text(p)
        todo = ((getcwd() if base is None else base) + "/" + p if p[:1] != "/" else p).split("/")
        last = todo.pop() if entry else None
        out, hops = [], 0
        while todo:
            part = todo.pop(0)
            if part in ("", ".", ".."):
                out = out[:-1] if part == ".." else out
                continue
            cand = "/" + "/".join(out + [part])
            try:
                link = lstat(cand).st_mode & 0o170000 == 0o120000
            except oserror:
                link = False
            if not link:
                out.append(part)
                continue
            hops += 1
            if hops > 40:
                raise oserror(40, "too many symbolic links", cand)
            target = readlink(cand)
            todo = target.split("/") + todo
            out = [] if target[:1] == "/" else out
        return "/" + "/".join(out + ([last] if last not in (None, "", ".") else []))

    return text, resolve


def _make_deny(report_fd: int, write: Any) -> Callable:
    """deny(reason, event, detail): report a violation record, then raise PermissionError."""
    str_, perm, oserror = str, PermissionError, OSError
    safe = {c: "?" for c in range(32)} | {ord('"'): "'", ord("\\"): "/"}  # keeps the JSON line valid

    def deny(reason, event, detail):
        line = ('{"kind": "violation", "reason": "%s", "event": "%s", "detail": "%s"}\n'
                % (reason, event, str_(detail)[:300].translate(safe)))
        try:
            write(report_fd, line.encode("utf-8", "replace"))
        except oserror:
            pass
        raise perm(13, "sandbox: %s %s is not allowed" % (event, str_(detail)[:200]))

    return deny


def _make_file_check(work: str, read_roots: list[str], text: Callable, resolve: Callable, deny: Callable,
                     readlink: Any) -> Callable:
    """check(event, args) -> handled? for file events: writes only inside `work`; reads there, in
    `read_roots` and a few devices; the working folder never leaves `work` (so descriptor-relative
    opens, whose `open` event has no dir_fd, resolve the same for the hook and the kernel)."""
    import posix

    int_, len_, any_, type_, enumerate_ = int, len, any, type, enumerate
    readable, writable, path_write = (work, *read_roots), (work,), dict(_PATH_WRITE)
    dev = ("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero")
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    forbidden = FORBIDDEN

    def under(p, roots):
        return any_(p == r or p.startswith(r + "/") for r in roots)

    def dir_of(fd):
        return None if fd is None or fd == -1 else readlink("/proc/self/fd/%d" % fd)

    def check_open(event, path, mode, flags):
        if type_(path) is int_:
            return  # an already-open descriptor
        p = resolve(path)
        wants_write = (flags or 0) & write_flags or any_(c in (mode or "") for c in "wax+")
        if not (under(p, writable) or p == "/dev/null" or (not wants_write and (under(p, readable) or p in dev))):
            deny(forbidden, event, p)

    def check_paths(event, args):
        paths, fds = path_write[event]
        for k, i in enumerate_(paths):
            if type_(args[i]) is int_:
                continue  # an open descriptor (ftruncate, fchmod...)
            base = dir_of(args[fds[k]]) if k < len_(fds) and fds[k] < len_(args) else None
            p = resolve(args[i], base, entry=event not in ("os.chmod", "os.chown", "os.utime"))
            if not under(p, writable):
                deny(forbidden, event, p)
        if event == "os.symlink":  # the link's target, relative to the link's folder, must stay inside
            link = resolve(args[1], dir_of(args[2]), entry=True)
            if not under(resolve(args[0], link[: link.rfind("/")] or "/"), writable):
                deny(forbidden, event, text(args[0]))

    def check(event, args):
        if event == "open":
            check_open(event, *args)
        elif event in ("os.listdir", "os.scandir", "os.chdir"):
            if args and args[0] is not None and type_(args[0]) is not int_:
                p = resolve(args[0])
                if not under(p, writable if event == "os.chdir" else readable):
                    deny(forbidden, event, p)
        elif event in path_write:
            check_paths(event, args)
        elif event == "sqlite3.connect" and args[0] not in (":memory:", "", b":memory:"):
            check_open(event, args[0], "w", 0)
        else:
            return False
        return True

    return check


def _make_other_check(work: str, resolve: Callable, deny: Callable) -> Callable:
    """check(event, args) for sockets (AF_UNIX inside `work` only), signals (ourselves and our
    children only), exec/spawn, name lookups, ctypes and gc introspection (all denied)."""
    import posix

    int_, bytes_, str_, type_, bad = int, bytes, str, type, (OSError, IndexError, ValueError)
    popen, pread, pclose, rdonly, getpid = posix.open, posix.read, posix.close, posix.O_RDONLY, posix.getpid
    deny_map, forbidden, network, work_ = dict(_DENY), FORBIDDEN, NETWORK, work + "/"

    def parent_of(pid):
        try:
            fd = popen("/proc/%d/stat" % pid, rdonly)
            data = pread(fd, 4096)
            pclose(fd)
            return int_(data.rsplit(b")", 1)[1].split()[1])
        except bad:
            return None

    def check(event, args):
        if event == "socket.__new__":
            if args[1] not in (1, -1):  # AF_UNIX, or wrapping an inherited descriptor
                deny(network, event, "address family %s" % args[1])
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            addr = args[1]  # AF_UNIX addresses are str or bytes; abstract ones are private to our netns
            if not (type_(addr) in (str_, bytes_) and (addr[:1] in ("\0", b"\0") or (resolve(addr) + "/").startswith(work_))):
                deny(network, event, addr)
        elif event == "os.kill":
            pid = args[0]
            if not (pid == getpid() or (pid > 1 and parent_of(pid) == getpid())):
                deny(forbidden, event, "pid %s" % pid)
        elif event in deny_map:
            deny(deny_map[event], event, args[0] if args else "")
        elif event.startswith("ctypes."):
            deny(forbidden, event, "ctypes (it can bypass this hook)")

    return check


def make_hook(work: str, read_roots: list[str], report_fd: int) -> Callable[..., None]:
    """A PEP 578 audit hook enforcing the checks above; a denial is reported on `report_fd` and
    raised as PermissionError, which aborts the operation even if the program catches it.

    Hardened against monkeypatching: the hook and its helpers read no global name (builtins
    included) and call only C functions captured at install time, so replacing `os.path.realpath`
    or `builtins.isinstance` changes nothing (tests/test_sandbox.py checks the bytecode)."""
    import _thread
    import posix

    text, resolve = _make_resolve(posix.getcwd, posix.lstat, posix.readlink, sys.getfilesystemencoding())
    deny = _make_deny(report_fd, posix.write)
    file_check = _make_file_check(work, read_roots, text, resolve, deny, posix.readlink)
    other_check = _make_other_check(work, resolve, deny)
    get_ident, busy = _thread.get_ident, set()

    def hook(event, args):
        tid = get_ident()
        if tid in busy:
            return  # our own file operations (parent_of) re-enter the hook
        busy.add(tid)
        try:
            if not file_check(event, args):
                other_check(event, args)
        finally:
            busy.discard(tid)

    return hook
