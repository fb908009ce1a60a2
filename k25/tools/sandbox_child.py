"""The sandboxed process behind `k25.tools.python` (run as a script), and the pipe framing both sides share.

The parent starts this file with `python -I` and a clean environment. It reads one `init` message, isolates
itself (see `isolate`: network and mount namespaces, a chroot of read-only library bind mounts, rlimits, an
unprivileged per-sandbox uid, no_new_privs, an audit hook), reports what it got, then serves `bind` and `run`
requests until its request pipe closes. It uses the standard library only until user code imports numpy or
Pillow (the chroot keeps the interpreter's library prefixes readable, so later imports work).

Framing: an 8-byte little-endian header length, a JSON header (never pickle: the parent must not execute
anything the child sends), then raw byte blobs whose sizes the header lists (images as raw pixels).
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import resource
import select
import signal
import struct
import sys
import threading
import time
import traceback

_LEN = struct.Struct("<Q")


class ProtocolError(Exception):
    """The other side closed the pipe or sent something that is not a well-formed message."""


def send_msg(fd: int, header: dict, blobs: list[bytes] | tuple = ()) -> None:
    header = dict(header, blob_sizes=[len(b) for b in blobs])
    raw = json.dumps(header).encode()
    for chunk in (_LEN.pack(len(raw)), raw, *blobs):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    parts, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no complete message before the deadline")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("pipe closed")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def recv_msg(fd: int, *, deadline: float | None = None, max_header: int = 64 << 20,
             max_blobs: int = 1 << 30) -> tuple[dict, list[bytes]]:
    """One message; TimeoutError past `deadline`, ProtocolError on EOF or on sizes beyond the caps."""
    (size,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    if size > max_header:
        raise ProtocolError(f"header of {size} bytes exceeds the {max_header}-byte cap")
    try:
        header = json.loads(_read_exact(fd, size, deadline))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed header: {e}") from None
    sizes = header.get("blob_sizes") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise ProtocolError("header without a valid blob_sizes list")
    if sum(sizes) > max_blobs:
        raise ProtocolError(f"{sum(sizes)} blob bytes exceed the {max_blobs}-byte cap")
    return header, [_read_exact(fd, s, deadline) for s in sizes]


# ---------------------------------------------------------------------------------------------- isolation
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, \
    MS_RELATIME = 1, 2, 4, 8, 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 38, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
WORKDIR_IN_CHROOT = "/sandbox"
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _libc():
    import ctypes  # also keeps ctypes in sys.modules, so numpy's `import ctypes` later never re-runs its dlopen

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> str | None:
    """unshare(2) for this process; None on success, else the errno text."""
    if hasattr(os, "unshare"):  # Python 3.12+
        try:
            os.unshare(flags)
            return None
        except OSError as e:
            return e.strerror
    ctypes, libc = _libc()
    if not hasattr(libc, "unshare"):
        return "unshare(2) does not exist on this platform"
    if libc.unshare(flags) == 0:
        return None
    return os.strerror(ctypes.get_errno())


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ctypes, libc = _libc()
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")


def library_roots() -> list[str]:
    """Directories the interpreter and its packages live in (read-only inside the sandbox), outermost first."""
    cands = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix]
    cands += [p for p in sys.path if p and os.path.isdir(p)]
    roots: list[str] = []
    for path in sorted({os.path.realpath(p) for p in cands}, key=len):
        if not any(path == r or path.startswith(r + "/") for r in ["/usr", *roots]):
            roots.append(path)
    return roots


def _build_root(root: str, disk_mb: int, uid: int) -> None:
    """A tmpfs root holding read-only bind mounts of /usr and the library roots, device nodes, and a
    size-limited private tmpfs work directory; the caller chroots into it. Mounts are private to this
    process's mount namespace, so nothing of it is visible outside or outlives the process."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.umask(0o022)  # the directories leading to each mount must be searchable by the sandbox's uid

    def bind(src: str, read_only: bool = True) -> None:
        dst = root + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _mount(src, dst, None, MS_BIND | MS_REC)
        # a remount must keep the source's flags: inside a user namespace they are locked, and clearing one fails
        f = os.statvfs(src).f_flag
        kept = sum(ms for st, ms in ((os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                                     (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)) if f & st)
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_NOSUID | kept | (MS_RDONLY if read_only else 0))

    bind("/usr")
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            bind(top)
    for path in library_roots():
        bind(path)
    if os.path.isfile("/etc/ld.so.cache"):  # where the loader finds multiarch libraries for later imports
        bind("/etc/ld.so.cache")
    for dev in DEVICES:
        if os.path.exists(dev):
            bind(dev, read_only=False)
    work = root + WORKDIR_IN_CHROOT
    os.makedirs(work)
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=0700,uid={uid},gid={uid}")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")


_PROMISED = ("numpy", "PIL", "scipy", "scipy.ndimage")


def world_readable(module: str) -> bool:
    """Whether an unprivileged uid can import `module`: its package directory and `__init__` readable by
    others, and every directory from its library root down to it readable and searchable by others."""
    import importlib.util

    top_name, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top_name)  # a top-level name: found without running any package code
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    origin = os.path.join(os.path.dirname(spec.origin), *rest, "__init__.py") if rest else spec.origin
    path = os.path.realpath(origin)
    roots = [r for r in ["/usr", *library_roots()] if path.startswith(r + "/")]
    top = max(roots, key=len) if roots else "/"
    try:
        if not os.stat(path).st_mode & 0o004:
            return False
        d = os.path.dirname(path)
        while True:
            if os.stat(d).st_mode & 0o005 != 0o005:
                return False
            if d == top or d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def _map_user(uid: int, gid: int) -> None:
    """In a fresh user namespace: map our own uid/gid (read before the unshare: unmapped, they read as the
    overflow id) to themselves, not to 0, so an exec could not regain capabilities as root of the namespace."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _drop_capabilities() -> None:
    """Give up the capabilities the creator of a user namespace holds in it (else CAP_SYS_CHROOT would let
    code leave the chroot): the bounding and ambient sets, then effective/permitted/inheritable."""
    ctypes, libc = _libc()
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    if libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _fork_into_pid_namespace(keep_fds: tuple[int, ...], scratch: str) -> None:
    """After unshare(CLONE_NEWPID) only children enter the new namespace: fork once. The child (PID 1 there)
    returns and becomes the sandbox; it can name, and so signal, no process outside. This process stays
    as its waiter, removes the host scratch directory (even when the parent died without closing), and exits
    the way the child did, so the parent sees the real exit status or signal."""
    pid = os.fork()
    if pid == 0:
        ctypes, libc = _libc()
        # the parent's hard kill hits the whole process group; this covers a waiter killed any other way
        # (getppid() is 0 here: the waiter lives outside this namespace)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        return
    for fd in keep_fds:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    import shutil

    if not os.path.ismount(os.path.join(scratch, "root")):  # the chroot's mounts live in the child's namespace
        shutil.rmtree(scratch, ignore_errors=True)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


# seccomp: system calls refused with EPERM (x86_64 numbers, asm/unistd_64.h). Kernel interfaces a Python cell
# never needs and that are the usual ways into kernel bugs or out of namespaces: tracing, (re)mounting,
# namespaces, keyrings, BPF, perf, userfaultfd, modules, kexec, cross-process memory, file handles, io_uring,
# the new mount API, exec. socket() is allowed for AF_UNIX only (no netlink, packet or raw sockets).
_SECCOMP_X86_64 = {
    "ptrace": 101, "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "init_module": 175, "delete_module": 176, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "execve": 59, "execveat": 322,
}
_NR_SOCKET, _NR_CLONE3, _NR_SECCOMP, _AUDIT_ARCH_X86_64 = 41, 435, 317, 0xC000003E


def _install_seccomp() -> str:
    """A classic-BPF deny-list filter on every thread (needs no_new_privs, set before). Returns a description
    for the isolation report."""
    import errno
    import platform

    if platform.machine() != "x86_64":
        return f"not installed (no syscall table for {platform.machine()})"
    ctypes, libc = _libc()
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, kill),  # another ABI (int 0x80): kill
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 system calls
    for nr in sorted(_SECCOMP_X86_64.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, _NR_CLONE3), (ret, 0, 0, enosys)]  # so threads fall back to clone(), which NPROC limits
    prog += [(jeq, 0, 3, _NR_SOCKET), (ld, 0, 0, 16), (jeq, 1, 0, 1), (ret, 0, 0, eperm)]  # args[0] == AF_UNIX
    prog += [(ret, 0, 0, allow)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, prog): the lifeline thread gets it too
    if libc.syscall(_NR_SECCOMP, 1, 1, ctypes.byref(fprog)) != 0:
        err = ctypes.get_errno()
        return f"not installed ({os.strerror(err)})"
    return f"deny-list of {len(_SECCOMP_X86_64) + 1} system calls, socket() for AF_UNIX only"


def _start_lifeline(fd: int) -> None:
    """Exit as soon as the parent is gone (its end of this pipe closes), even while user code runs."""

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os._exit(70)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def isolate(cfg: dict) -> dict:
    """Apply every layer the kernel allows and return what is in force (the tool reports it)."""
    report = {"network": "audit-hook", "filesystem": "audit-hook", "user": "unchanged", "pids": "shared",
              "ipc": "shared", "notes": []}
    _libc()  # import ctypes before the hook: numpy imports it, and its import-time dlopen would be refused
    root = os.geteuid() == 0
    workdir = cfg["host_workdir"]
    chrooted = False
    uid = cfg.get("uid") or (1_000_000_000 + os.getpid())  # unique per live sandbox: sandboxes cannot signal each other
    in_userns = False
    if cfg["os_isolation"]:
        # 1. PIDs (and, without root, a user namespace of our own, in which the rest is allowed): only children
        #    enter a new PID namespace, so fork; this process stays outside as the waiter, in the host's mounts.
        outer_uid, outer_gid = os.getuid(), os.getgid()
        err = _unshare(CLONE_NEWPID | (0 if root else CLONE_NEWUSER))
        if err is None:
            if not root:
                _map_user(outer_uid, outer_gid)
                uid, in_userns = outer_uid, True
            report["pids"] = "pidns"
            _fork_into_pid_namespace(cfg["inherited_fds"], os.path.dirname(cfg["root_dir"]))
        else:
            report["notes"].append(f"no PID namespace ({err})")
            if not root and _unshare(CLONE_NEWUSER) is None:
                _map_user(outer_uid, outer_gid)
                uid, in_userns = outer_uid, True
        # 2. network, mounts and SysV IPC, then the chroot
        err = _unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)
        if err is None:
            report.update(network="netns", ipc="ipcns")
            try:
                _build_root(cfg["root_dir"], cfg["disk_mb"], uid)
                os.chroot(cfg["root_dir"])
                workdir, chrooted = WORKDIR_IN_CHROOT, True
                report["filesystem"] = "chroot"
            except OSError as e:
                report["notes"].append(f"chroot unavailable ({e}); files guarded by the audit hook only")
        else:
            report["notes"].append(f"unshare(NEWNET|NEWNS|NEWIPC) failed ({err})")
            if _unshare(CLONE_NEWNET) is None:
                report["network"] = "netns"
    os.chdir(workdir)
    if root and cfg["os_isolation"]:
        unreadable = [] if chrooted else ["the library prefixes (no chroot)"]
        unreadable += [p for p in _PROMISED if not world_readable(p)]
        if unreadable:
            # The new uid could not import these (e.g. no chroot and the interpreter under /root, or a venv
            # installed with umask 077), so import what the tool promises while still root.
            report["notes"].append("preloaded numpy, PIL and scipy.ndimage before dropping privileges; not readable "
                                   "by other users: " + ", ".join(unreadable) + " (later imports from there fail)")
            import numpy  # noqa: F401
            import PIL.Image
            import scipy.ndimage  # noqa: F401

            PIL.Image.init()
    _start_lifeline(cfg["lifeline_fd"])
    limits = {
        "RLIMIT_AS": cfg["memory_mb"] << 20,
        "RLIMIT_FSIZE": cfg["disk_mb"] << 20,
        "RLIMIT_CPU": int(cfg["cpu_budget_s"]) + 2,  # hard: SIGKILL; the soft limit (SIGXCPU) is per call
        "RLIMIT_NPROC": 0,  # no fork, no thread (not enforced for root: hence the uid drop)
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_MEMLOCK": 0,
        "RLIMIT_MSGQUEUE": 0,
    }
    for name, value in limits.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (AttributeError, ValueError, OSError) as e:  # e.g. a platform without this limit
            report["notes"].append(f"{name} not set ({type(e).__name__}: {e})")
    report["limits"] = {"memory_mb": cfg["memory_mb"], "disk_mb": cfg["disk_mb"], "cpu_budget_s": cfg["cpu_budget_s"],
                        "nproc": 0, "nofile": 64}
    if root and cfg["os_isolation"]:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        report["user"] = f"uid {uid}"
    elif in_userns:
        _drop_capabilities()
        report["user"] = f"uid {uid} in a user namespace, no capabilities"
    if cfg["os_isolation"]:
        ctypes, libc = _libc()
        if hasattr(libc, "prctl") and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            report["no_new_privs"] = True
        if report.get("pids") == "pidns":
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # again: a uid change clears it
        if report.get("no_new_privs") and cfg.get("seccomp", True):
            report["seccomp"] = _install_seccomp()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the file-size limit fail with EFBIG instead
    os.environ.update(HOME=workdir, TMPDIR=workdir)  # caches and temporary files go to the private directory
    report["workdir"] = workdir
    report["audit_hook"] = bool(cfg["audit_hook"])
    if cfg["audit_hook"]:
        read_roots = ["/usr", *library_roots(), *DEVICES, "/etc/ld.so.cache"]
        if not chrooted:
            read_roots += ["/lib", "/lib64", "/bin"]
        install_audit_hook(workdir, read_roots)
    return report


# ------------------------------------------------------------------------------------------- audit hook
# Events refused outright, with the words the error uses.
_DENY = {
    "subprocess.Popen": "starting a subprocess", "os.system": "running a shell command",
    "os.exec": "exec()", "os.posix_spawn": "spawning a process", "os.spawn": "spawning a process",
    "os.fork": "fork()", "os.forkpty": "fork()", "pty.spawn": "spawning a process",
    "os.kill": "sending signals", "os.killpg": "sending signals", "signal.pthread_kill": "sending signals",
    "ctypes.dlopen": "ctypes", "ctypes.dlsym": "ctypes", "ctypes.dlsym/handle": "ctypes", "ctypes.cdata": "ctypes",
    "ctypes.cdata/buffer": "ctypes", "ctypes.call_function": "ctypes", "ctypes.string_at": "ctypes",
    "ctypes.wstring_at": "ctypes", "ctypes.addressof": "ctypes", "ctypes.PyObj_FromPtr": "ctypes",
    "resource.setrlimit": "changing resource limits", "resource.prlimit": "changing resource limits",
    "gc.get_objects": "gc introspection", "gc.get_referrers": "gc introspection",
    "gc.get_referents": "gc introspection",
    "sys.setprofile": "profiling hooks", "sys.settrace": "tracing hooks",
}
_WRITE_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
                 "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.chown")
_READ_EVENTS = ("os.listdir", "os.scandir", "os.chdir", "os.listxattr", "os.getxattr", "glob.glob")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_audit_hook(workdir: str, read_roots: list[str]) -> None:
    """Refuse process creation, signals, ctypes, sockets, and file access outside `workdir` (writes) or
    `workdir` + the read-only library roots (reads). A second line of defence with clear messages: Python code
    that is determined enough can get around any audit hook, so the OS layers above are what isolation rests on.
    Everything the hook reads is bound here as immutable closure state."""
    deny = tuple(sorted(_DENY.items()))
    deny_map = dict(deny)
    deny_events = frozenset(deny_map)
    work = os.path.realpath(workdir)
    write_roots = (work,)
    reads = tuple(sorted({os.path.realpath(r) for r in read_roots} | {work}))
    realpath, fspath, getcwd, join = os.path.realpath, os.fspath, os.getcwd, os.path.join
    write_events, read_events, write_flags = frozenset(_WRITE_EVENTS), frozenset(_READ_EVENTS), _WRITE_FLAGS
    rlimit_cpu = resource.RLIMIT_CPU

    def resolve(path):
        if isinstance(path, int) or path is None:
            return None  # an already-open descriptor or the current directory (itself checked on chdir)
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode(errors="surrogateescape")
        return realpath(join(getcwd(), path))

    def inside(path: str, roots: tuple) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def check(path, write: bool, raw) -> None:
        if path is None:
            return
        if not inside(path, write_roots if write else reads):
            what = "writing" if write else "reading"
            where = f"only {work} is writable" if write else f"only {work} and the read-only libraries are visible"
            raise PermissionError(f"sandbox: {what} {raw!r} is not allowed ({where})")

    def hook(event: str, args: tuple) -> None:
        if event == "resource.setrlimit" and args and args[0] == rlimit_cpu:
            return  # the per-call CPU limit (a process can only move its soft limit below the hard one)
        if event in deny_events:
            raise PermissionError(f"sandbox: {deny_map[event]} is not allowed")
        if event.startswith("socket."):
            raise PermissionError("sandbox: network access is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & write_flags))
            check(resolve(path), write, path)
        elif event in write_events:
            check(resolve(args[0]), True, args[0])
        elif event in read_events:
            check(resolve(args[0]) if args else None, False, args[0] if args else None)
        elif event in ("os.rename", "os.link", "shutil.copyfile", "shutil.copytree", "shutil.move"):
            check(resolve(args[0]), event in ("os.rename", "shutil.move"), args[0])
            check(resolve(args[1]), True, args[1])
        elif event == "os.symlink":
            check(resolve(args[1]), True, args[1])

    sys.addaudithook(hook)


# ---------------------------------------------------------------------------------------------- session
class SandboxTimeout(BaseException):
    """Raised into user code by the wall-time alarm or the CPU-time signal (a BaseException, so a bare
    `except Exception` in user code does not swallow it; the parent's hard kill backs it up)."""


class CappedOutput:
    """stdout/stderr replacement that keeps the first and last `limit // 2` characters and counts the rest,
    so a flood of output costs neither memory nor the model's context."""

    def __init__(self, limit: int):
        self.half = max(limit // 2, 1)
        self.head: list[str] = []
        self.head_len = 0
        self.tail: list[str] = []
        self.tail_len = 0
        self.total = 0

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.total += len(s)
        if self.head_len < self.half:
            take = s[: self.half - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            self.tail.append(s[-self.half:])
            self.tail_len += min(len(s), self.half)
            while self.tail_len - len(self.tail[0]) >= self.half:
                self.tail_len -= len(self.tail.pop(0))
        return self.total

    encoding, errors = "utf-8", "strict"

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("captured output has no file descriptor")

    def getvalue(self) -> str:
        head = "".join(self.head)
        tail = "".join(self.tail)
        shown = len(head) + len(tail)
        if self.total <= shown:
            return head + tail
        tail = tail[-self.half:]
        omitted = self.total - len(head) - len(tail)
        return (f"{head}\n[output truncated: {self.total} characters in all; {omitted} omitted between the first "
                f"{len(head)} and the last {len(tail)}]\n{tail}")


class Session:
    """A persistent namespace run like an IPython cell: statements run, the value of a final expression is
    shown as `Out[n]`, and images passed to `display()` (or a final PIL image) are returned."""

    IMAGE_MODES = {"L": 1, "RGB": 3, "RGBA": 4}

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.count = 0
        self.exhausted = False
        self.images: list = []
        self.notes: list[str] = []
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins, "display": self.display}

    # images -------------------------------------------------------------------------------------------
    def bind(self, header: dict, blobs: list[bytes]) -> None:
        from PIL import Image

        for spec, data in zip(header["images"], blobs):
            self.ns[spec["name"]] = Image.frombytes(spec["mode"], tuple(spec["size"]), data)

    def _to_image(self, obj):
        from PIL import Image

        if not isinstance(obj, Image.Image):
            import numpy as np

            arr = np.asarray(obj)
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or arr.size == 0:
                raise TypeError(f"display() takes a PIL image or an array of shape (H, W), (H, W, 3) or (H, W, 4); "
                                f"got {type(obj).__name__} with shape {arr.shape}")
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            elif np.issubdtype(arr.dtype, np.floating):
                scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
                arr = np.rint(np.nan_to_num(arr * scale))
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            obj = Image.fromarray(arr)
        if obj.mode not in self.IMAGE_MODES:
            obj = obj.convert("RGBA" if "A" in obj.getbands() else ("L" if obj.mode in ("1", "I", "F", "I;16")
                                                                     else "RGB"))
        return obj

    def display(self, *objs) -> None:
        """Show images to the model (PIL images, uint8/bool/float arrays, matplotlib figures); other objects
        are printed."""
        for obj in objs:
            try:
                from PIL import Image

                is_image = isinstance(obj, Image.Image) or type(obj).__module__.startswith("numpy")
            except ImportError:
                is_image = False
            if hasattr(obj, "savefig") and hasattr(obj, "canvas"):  # a matplotlib figure
                import io

                from PIL import Image

                buf = io.BytesIO()
                obj.savefig(buf, format="png")
                buf.seek(0)
                obj, is_image = Image.open(buf).convert("RGB"), True
            if not is_image:
                print(repr(obj))
                continue
            img = self._to_image(obj)
            if len(self.images) >= self.cfg["max_images"]:
                self.notes.append(f"[image not returned: at most {self.cfg['max_images']} images per call]")
                continue
            w, h = img.size
            if w * h > self.cfg["max_image_pixels"]:
                scale = (self.cfg["max_image_pixels"] / (w * h)) ** 0.5
                img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))))
                self.notes.append(f"[image {len(self.images)} downscaled from {w}x{h} to {img.size[0]}x{img.size[1]}]")
            self.images.append(img.copy())

    # running ------------------------------------------------------------------------------------------
    def _format_error(self, exc: BaseException) -> str:
        me = os.path.realpath(__file__)
        tb = exc.__traceback__
        while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
            tb = tb.tb_next
        lines = traceback.format_exception(type(exc), exc, tb)
        return "".join(line for line in lines if me not in line).rstrip()

    def run(self, code: str, timeout_s: float) -> tuple[str, str | None]:
        global _INTERRUPTIBLE
        self.count += 1
        self.images, self.notes = [], []
        name = f"<cell-{self.count}>"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        out = CappedOutput(self.cfg["max_output_chars"])
        error = None
        saved = sys.stdout, sys.stderr
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        budget = self.cfg["cpu_budget_s"]
        if used >= budget - 0.5:
            self.exhausted = True
            return "", (f"TimeoutError: this session's CPU-time budget ({budget} s) is used up; the Python session "
                        "is restarted, so earlier variables are gone")
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        try:  # SIGXCPU (-> SandboxTimeout) after timeout_s more CPU seconds, or at the session budget
            resource.setrlimit(resource.RLIMIT_CPU, (min(budget, int(used + timeout_s) + 1), hard))
        except (ValueError, OSError):
            pass  # user code lowered the hard limit; the wall-time alarm and the parent's kill still apply
        sys.stdout = sys.stderr = out
        _INTERRUPTIBLE = True
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            tree = ast.parse(code, name, "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, name, "exec"), self.ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), name, "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    if type(value).__module__.startswith("PIL."):
                        self.display(value)
                    else:
                        out.write(f"Out[{self.count}]: {value!r}\n")
        except SandboxTimeout as e:
            error = f"{e}: execution was interrupted (variables defined so far are kept)"
        except MemoryError:
            error = f"MemoryError: the sandbox's memory limit is {self.cfg['memory_mb']} MB"
        except SyntaxError as e:
            error = "".join(traceback.format_exception_only(type(e), e)).rstrip()
        except BaseException as e:  # noqa: BLE001 - user code's exceptions (SystemExit included) are its results
            error = self._format_error(e)
        finally:
            _INTERRUPTIBLE = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout, sys.stderr = saved
        text = out.getvalue()
        if error is not None and len(error) > self.cfg["max_output_chars"]:
            capped = CappedOutput(self.cfg["max_output_chars"])
            capped.write(error)
            error = capped.getvalue()
        if self.notes:
            text += ("\n" if text and not text.endswith("\n") else "") + "\n".join(self.notes)
        return text, error

    def result_blobs(self) -> tuple[list[dict], list[bytes]]:
        specs, blobs = [], []
        for img in self.images:
            specs.append({"mode": img.mode, "size": list(img.size)})
            blobs.append(img.tobytes())
        return specs, blobs


# Whether a limit signal may interrupt: set while a cell's code runs, cleared by the first interruption and when
# the cell ends. The wall-time alarm and the CPU-time signal can both fire for one cell; the second, arriving
# while the first is being handled or after the cell returned, would otherwise raise outside any handler and
# end the session process (exit code 1) instead of reporting the timeout.
_INTERRUPTIBLE = False


def _interrupt(message: str) -> None:
    global _INTERRUPTIBLE
    if _INTERRUPTIBLE:
        _INTERRUPTIBLE = False
        raise SandboxTimeout(message)


def _on_alarm(signum, frame):
    _interrupt("TimeoutError: wall-time limit reached")


def _on_xcpu(signum, frame):
    _interrupt("TimeoutError: CPU-time limit reached")


def main() -> None:
    req_fd, resp_fd = int(sys.argv[1]), int(sys.argv[2])
    header, _ = recv_msg(req_fd)
    cfg = header["config"]
    try:
        report = isolate(cfg)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which refuses to use this process
        where = traceback.extract_tb(e.__traceback__)[-1]
        send_msg(resp_fd, {"op": "failed", "error": f"{type(e).__name__}: {e} (in {where.name}, line {where.lineno})"})
        raise SystemExit(3) from None
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXCPU, _on_xcpu)
    session = Session(cfg)
    send_msg(resp_fd, {"op": "ready", "isolation": report})
    while True:
        try:
            header, blobs = recv_msg(req_fd)
        except ProtocolError:
            os._exit(0)
        if header["op"] == "bind":
            try:
                session.bind(header, blobs)
                send_msg(resp_fd, {"op": "bound"})
            except Exception as e:  # noqa: BLE001
                send_msg(resp_fd, {"op": "bound", "error": f"{type(e).__name__}: {e}"})
        elif header["op"] == "run":
            text, error = session.run(header["code"], header["timeout_s"])
            specs, blobs = session.result_blobs()
            send_msg(resp_fd, {"op": "result", "id": header.get("id"), "text": text, "error": error,
                               "images": specs, "restart": session.exhausted}, blobs)
            if session.exhausted:
                os._exit(0)  # the parent replaces the process at the next call


if __name__ == "__main__":
    main()
