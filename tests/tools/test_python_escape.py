"""The escape suite (the `outside` fixture is in conftest.py): each attempt must fail with a clear tool error, change nothing outside the sandbox, and
leave the session usable for the next call.

Every attempt runs against the sandbox as shipped ("full": OS isolation + audit hook). Where it is safe to
run on a shared machine, it also runs with one layer switched off, to show the other holds by itself:
"os_only" (namespaces, chroot, unprivileged uid, rlimits, seccomp; no audit hook) and "hook_only" (the audit hook and
rlimits alone, as on a kernel without namespaces). Attempts that would be dangerous if the one remaining
layer failed (a fork bomb or kill(-1) as root) are not run in hook_only mode.
"""

import os
import signal
import socket
import time

import pytest

from k25.tools import PythonSandbox

MODES = {"full": {}, "os_only": {"audit_hook": False}, "hook_only": {"os_isolation": False}}
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def sandbox(request):
    mode = request.param
    with PythonSandbox(timeout_s=2, memory_mb=512, kill_grace_s=2, max_output_chars=1000, **MODES[mode]) as sb:
        sb.mode = mode
        yield sb


def still_works(sb):
    r = sb.run("1 + 1")
    assert r.error is None and r.text.endswith(": 2\n"), r


def failed(r, mode, os_error):
    """The attempt failed with a clear error: the hook's own message, or (os_only) the kernel's refusal."""
    assert r.error is not None, r
    if mode == "os_only":
        assert any(e in r.error for e in os_error), r.error
    else:  # the hook's PermissionError, or a library's error that wraps it (urllib's URLError)
        assert "sandbox: " in r.error and "is not allowed" in r.error, r.error


def snapshot(d):
    return {name: open(os.path.join(d, name)).read() for name in sorted(os.listdir(d))}


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "open({secret!r}).read()",
    "import pathlib; pathlib.Path({secret!r}).read_text()",
    "import os; os.chdir('/'); open({secret_rel!r}).read()",
    "import os; os.symlink({secret!r}, 'link'); open('link').read()",
    "import os; os.listdir({dir!r})",
    "open('/etc/hostname').read()",
])
def test_read_a_file_outside(sandbox, outside, code):
    secret = os.path.join(outside, "secret.txt")
    r = sandbox.run(code.format(secret=secret, secret_rel=secret.lstrip("/"), dir=outside))
    failed(r, sandbox.mode, ("FileNotFoundError", "PermissionError"))
    assert "TOP-SECRET" not in r.text + r.error and "secret.txt" not in r.text
    sandbox.run(f"import os\nos.chdir({sandbox.isolation['workdir']!r})\nif os.path.lexists('link'): os.remove('link')")
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "open({new!r}, 'w').write('pwned')",
    "open({secret!r}, 'a').write('pwned')",
    "import os; fd = os.open({new!r}, os.O_WRONLY | os.O_CREAT); os.write(fd, b'pwned')",
    "import shutil; open('x', 'w').write('pwned'); shutil.copy('x', {new!r})",
    "import os; os.remove({secret!r})",
    "import os; os.mkdir({newdir!r})",
])
def test_write_a_file_outside(sandbox, outside, code):
    before = snapshot(outside)
    r = sandbox.run(code.format(new=os.path.join(outside, "new.txt"), secret=os.path.join(outside, "secret.txt"),
                                newdir=os.path.join(outside, "newdir")))
    failed(r, sandbox.mode, ("FileNotFoundError", "PermissionError", "Read-only file system"))
    assert snapshot(outside) == before
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "import socket; s = socket.socket(); s.settimeout(1); s.connect(('localhost', {port}))",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('127.0.0.1', {port}))",
])
def test_connect_to_a_port_on_the_host(sandbox, code):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        r = sandbox.run(code.format(port=port))
        failed(r, sandbox.mode, ("Operation not permitted", "Network is unreachable", "Name or service not known",
                                 "gaierror",
                                 "Temporary failure in name resolution", "Address family"))
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full", "os_only"], indirect=True)
def test_forge_or_corrupt_the_tool_protocol(sandbox):
    """The cell can write to the reply pipe (its number is in sys.argv): garbage, a frame with a wrong id, or a
    well-formed frame with the right id read from the child's frames. Garbage and wrong ids end in a restart;
    a frame with the right id is the cell's own output for its own call (the real answer that follows it is
    skipped, or the session restarted if it is already there). Never does it reach a later call."""
    frame = ("import json, os, struct, sys\n"
             "def frame(h):\n"
             "    raw = json.dumps(dict(h, blob_sizes=[])).encode()\n"
             "    os.write(int(sys.argv[2]), struct.pack('<Q', len(raw)) + raw)\n")
    attempts = [
        "import os, sys; os.write(int(sys.argv[2]), b'\\xff' * 8 + b'junk')",
        frame + "frame({'op': 'result', 'id': 'guess', 'text': 'forged', 'error': None, 'images': []})",
        frame + "f = sys._getframe()\nwhile 'header' not in f.f_locals: f = f.f_back\n"
                "frame({'op': 'result', 'id': f.f_locals['header']['id'], 'text': 'forged', 'error': None, 'images': []})",
    ]
    for i, code in enumerate(attempts):
        before = sandbox.restarts
        r = sandbox.run(code)
        if i < 2:
            assert r.error.startswith("SandboxError: the Python process broke the tool protocol"), r
        else:
            assert r.error is None and r.text.startswith("forged"), r
        for _ in range(2):
            r = sandbox.run("'own answer'")
            assert r.error is None and r.text.endswith(": 'own answer'\n"), r
        assert sandbox.restarts == before + (i < 2) or (i == 2 and sandbox.restarts == before + 1)


def test_network_namespace_alone_has_no_route_to_the_host():
    """seccomp already refuses AF_INET sockets; without it (and without the hook) the namespace stops them."""
    with socket.socket() as listener, PythonSandbox(timeout_s=30, memory_mb=512, audit_hook=False,
                                                    seccomp=False) as sb:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        assert "seccomp" not in sb.isolation and sb.isolation["network"] == "netns"
        r = sb.run(f"import socket; socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=1)")
        assert r.error is not None and "Network is unreachable" in r.error, r.error
        time.sleep(0.1)
        with pytest.raises(BlockingIOError):
            listener.accept()


def descendants(pid):
    """Processes below `pid` (the sandbox's waiter: with a PID namespace, the sandbox itself is its child)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "import subprocess; subprocess.run(['touch', {marker!r}])",
    "import subprocess; subprocess.check_output('touch {marker}', shell=True)",
    "import os; assert os.system('touch {marker}') == 0, 'shell failed'",
    "import os; os.popen('touch {marker}').read()",
    "import os; os.posix_spawn('/usr/bin/touch', ['touch', {marker!r}], {{}})",
    "import os; os.execv('/usr/bin/touch', ['touch', {marker!r}])",
    "import pty; pty.spawn(['touch', {marker!r}])",
])
def test_start_a_subprocess(sandbox, outside, code):
    marker = os.path.join(outside, "marker")
    before = descendants(sandbox._proc.pid)
    r = sandbox.run(code.format(marker=marker))
    failed(r, sandbox.mode, ("BlockingIOError", "Resource temporarily unavailable", "shell failed",
                             "FileNotFoundError", "OSError", "Operation not permitted"))
    assert not os.path.exists(marker)
    assert descendants(sandbox._proc.pid) == before
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full", "os_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()",
])
def test_fork_bomb(sandbox, code):
    before = descendants(sandbox._proc.pid)
    r = sandbox.run(code)
    assert r.error is not None and any(
        e in r.error for e in ("sandbox: fork() is not allowed", "can't start new thread", "BlockingIOError",
                               "Resource temporarily unavailable")), r.error
    assert descendants(sandbox._proc.pid) == before
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
@pytest.mark.parametrize("code", [
    "x = bytearray(10 ** 10)",
    "x = []\nwhile True:\n    x.append(bytes(10 ** 7))",  # calloc'd pages: the limit is hit without touching RAM
    "import numpy as np\nx = np.ones((1 << 16, 1 << 16))",
    "x = ' ' * (1 << 40)",
])
def test_memory_bomb(sandbox, code):
    r = sandbox.run(code)
    assert r.error is not None and "MemoryError" in r.error, r.error
    sandbox.run("x = None")
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full"], indirect=True)
def test_infinite_loop(sandbox):
    sandbox.run("kept = 'yes'")
    for code in ("while True:\n    pass", "import time\ntime.sleep(10 ** 6)",
                 "while True:\n    try:\n        sum(range(10 ** 7))\n    except Exception:\n        pass"):
        t0 = time.monotonic()
        r = sandbox.run(code)
        assert time.monotonic() - t0 < 2 + 2 + 2  # timeout_s + kill_grace_s + slack
        assert r.error is not None and r.error.startswith("TimeoutError:"), r.error
    # interrupted in the child (not killed), so the session kept its variables
    assert sandbox.run("kept").text.endswith(": 'yes'\n")


def test_cpu_time_limits():
    """The per-call CPU limit interrupts the cell (state kept); a spent session budget restarts the session."""
    with PythonSandbox(timeout_s=60, memory_mb=512, cpu_budget_s=2) as sb:
        sb.run("kept = 1")
        r = sb.run("while True:\n    pass")
        assert r.error.startswith("TimeoutError: CPU-time limit reached"), r.error
        r = sb.run("kept")
        assert r.error.startswith("TimeoutError: this session's CPU-time budget (2 s) is used up"), r.error
        r = sb.run("'kept' in globals()")
        assert r.error is None and r.text.endswith(": False\n") and "restarted" in r.text
        assert sb.restarts == 1


@pytest.mark.parametrize("sandbox", ["full"], indirect=True)
@pytest.mark.parametrize("code", [
    "print('x' * 10 ** 8)",
    "import sys\nfor i in range(10 ** 6):\n    sys.stdout.write('line %d\\n' % i)",
    "list(range(10 ** 6))",
    "import sys\nsys.stderr.write('e' * 10 ** 7)",
])
def test_huge_output(sandbox, code):
    r = sandbox.run(code)
    assert len(r.text) < 1000 + 200 and len(r.error or "") < 2000
    assert "[output truncated:" in r.text, r.text
    still_works(sandbox)


@pytest.mark.parametrize("sandbox", ["full"], indirect=True)
def test_huge_error_and_unicode_output(sandbox):
    sandbox.run("kept = 1")
    restarts = sandbox.restarts
    r = sandbox.run("raise ValueError('x' * 10 ** 7)")
    assert len(r.error) < 1200 and r.error.startswith("Traceback") and "[output truncated:" in r.error
    r = sandbox.run("print('\\U0001F600' * 10 ** 5 + '\\ud800')")
    assert r.error is None and "[output truncated:" in r.text and "\U0001F600" in r.text
    assert r.text.encode("utf-8").decode("utf-8").endswith("?\n")  # the lone surrogate, made encodable
    assert sandbox.restarts == restarts and sandbox.run("kept").text.endswith(": 1\n")


@pytest.mark.parametrize("sandbox", ["full", "os_only"], indirect=True)
def test_ctypes(sandbox):
    """With the hook, ctypes cannot even load a library. Without it, native calls run, yet as the sandbox's
    uid inside its chroot and PID namespace, under seccomp, they can neither signal the parent, regain root,
    leave the chroot or through a new namespace, trace, open netlink sockets nor exec."""
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        r = sandbox.run(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"(libc.kill({os.getpid()}, {int(signal.SIGUSR1)}), libc.setuid(0), libc.chroot(b'/'), "
            "libc.unshare(0x10000000), libc.unshare(0x40000000), libc.ptrace(0, 0, 0, 0), libc.socket(16, 3, 0), "
            "libc.execv(b'/usr/bin/true', None))")
        if sandbox.mode == "full":
            assert "PermissionError: sandbox: ctypes is not allowed" in r.error
        else:
            # seccomp refuses ptrace, netlink sockets and exec even to native code
            assert r.error is None and r.text.endswith(": (-1, -1, -1, -1, -1, -1, -1, -1)\n"), r
        r = sandbox.run("import numpy as np\nnp.ctypeslib.as_ctypes(np.zeros(3)); import ctypes\n"
                        "ctypes.string_at(id(1), 16)")
        if sandbox.mode == "full":
            assert "PermissionError: sandbox: ctypes is not allowed" in r.error
        time.sleep(0.1)
        assert got == []
    finally:
        signal.signal(signal.SIGUSR1, old)
    still_works(sandbox)


@pytest.mark.parametrize("mode", ["full", "os_only", "hook_only"])
def test_read_a_secret_from_the_parent_environment(mode, monkeypatch):
    secret = "k25-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("K25_TEST_SECRET", secret)
    with PythonSandbox(timeout_s=5, memory_mb=512, **MODES[mode]) as sb:
        env = sb.run("import os; dict(os.environ)")
        assert env.error is None and secret not in env.text and "K25_TEST_SECRET" not in env.text
        for code in ("import os; open(f'/proc/{os.getppid()}/environ', 'rb').read()",
                     "open('/proc/self/environ', 'rb').read()",
                     "import os; open(f'/proc/{os.getppid()}/cmdline', 'rb').read()"):
            r = sb.run(code)
            assert secret not in r.text + (r.error or "")
            if mode == "os_only":
                assert r.error is not None and "FileNotFoundError" in r.error  # no /proc in the chroot
            else:
                assert r.error is not None and "PermissionError: sandbox: reading" in r.error
        still_works(sb)
    assert os.environ["K25_TEST_SECRET"] == secret


@pytest.mark.parametrize("sandbox", ["full", "os_only", "hook_only"], indirect=True)
def test_signal_or_kill_the_parent(sandbox):
    """The hook refuses every signal call. Without it: inside its PID namespace the sandbox cannot name the
    parent (its pid does not exist there, getppid() is 0, kill(-1) finds nobody); signals it can send reach
    only its own process group (itself, PID 1 there, which ignores them, and its waiter, another uid)."""
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    usr1, me = int(signal.SIGUSR1), os.getpid()
    codes = [(f"import os; os.kill({me}, {usr1})", "ProcessLookupError"),
             (f"import os; os.kill({me}, {int(signal.SIGKILL)})", "ProcessLookupError"),
             (f"import os; os.kill(os.getppid(), {usr1})", None),
             (f"import os; os.killpg({os.getpgid(0)}, {usr1})", "ProcessLookupError"),
             (f"import signal, threading; signal.pthread_kill(threading.main_thread().ident, {usr1})", None)]
    if sandbox.mode != "hook_only":  # kill(-1) as root would reach every process on the machine
        codes.append((f"import os; os.kill(-1, {usr1})", "ProcessLookupError"))
    try:
        for code, os_error in codes:
            r = sandbox.run(code)
            if sandbox.mode == "os_only":
                assert os_error is None or (r.error is not None and os_error in r.error), (code, r)
            else:
                assert r.error is not None and "PermissionError: sandbox: sending signals is not allowed" in r.error
        time.sleep(0.1)
        assert got == []
    finally:
        signal.signal(signal.SIGUSR1, old)
    still_works(sandbox)
