"""The sandbox started by an unprivileged user (as on a laptop): user, mount, network, IPC and PID namespaces
of its own, the same chroot, capabilities dropped. Run here by starting the caller as an unprivileged uid
with `setpriv` (the tests run as root); the interpreter may live under a directory that uid cannot enter
(e.g. /root/.pyenv), so the caller gets a mount namespace in which that directory is reachable."""

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

UID = 54321

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from k25.tools import PythonSandbox
    secret, outside, parent = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"caller_uid": os.getuid(), "caller_reads_secret": open(secret).read()}
    with PythonSandbox(timeout_s=60, memory_mb=512) as sb:
        out["full"] = sb.isolation
        out["full_read"] = sb.run(f"open({secret!r}).read()").error
        out["full_kill"] = sb.run(f"import os; os.kill({parent}, 10)").error
    with PythonSandbox(timeout_s=60, memory_mb=512, audit_hook=False) as sb:
        out["os_only"] = sb.isolation
        run = lambda code: (lambda r: [r.text, r.error])(sb.run(code))
        out["read"] = run(f"open({secret!r}).read()")
        out["write"] = run(f"open({os.path.join(outside, 'new.txt')!r}, 'w').write('x')")
        out["kill_parent"] = run(f"import os; os.kill({parent}, 10)")
        out["kill_caller"] = run(f"import os; os.kill({os.getpid()}, 10)")
        out["native"] = run("import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
                            "(libc.chroot(b'/'), libc.unshare(0x10000000), libc.setuid(0), libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None))")
        out["connect"] = run("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)")
        out["fork"] = run("import os; os.fork()")
        out["libs"] = run("import numpy as np, scipy.ndimage as ndi, PIL.Image, os\\n"
                          "(int(ndi.label(np.eye(3))[1]), os.getuid(), os.getcwd())")
    print(json.dumps(out))
""")


def _reachable_cmd(paths: list[str]) -> str:
    """Shell lines that make `paths` reachable for other users inside the current mount namespace: a tmpfs
    over the first ancestor of each that others cannot enter, with the path bind-mounted back in place."""
    moves = {}
    for target in paths:
        path = "/"
        for part in target.strip("/").split("/")[:-1]:
            path = os.path.join(path, part)
            if not os.stat(path).st_mode & 0o001:
                moves[target] = path
                break
    if not moves:
        return ":"
    lines = [f'mkdir -p "$stage/{i}" && mount --bind {p} "$stage/{i}"' for i, p in enumerate(moves)]
    lines += [f"mount -t tmpfs -o mode=0755 tmpfs {a}" for a in sorted(set(moves.values()))]
    lines += [f'mkdir -p {p} && mount --move "$stage/{i}" {p}' for i, p in enumerate(moves)]
    return "stage=$(mktemp -d) && " + " && ".join(lines) + ' && rmdir "$stage"/* "$stage"'


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
                    reason="needs root (to start the caller as another uid), setpriv and unshare")
def test_unprivileged_caller_gets_full_isolation(outside):
    if subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "unshare", "-Urn", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled on this kernel")
    d = outside
    secret = os.path.join(d, "secret.txt")
    script = os.path.join(d, "caller.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    os.chmod(script, 0o644)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reach = _reachable_cmd([os.path.realpath(p) for p in {sys.base_prefix, sys.prefix, repo}])
    shell = (f"{reach} && cd {repo} && exec setpriv "
             f"--reuid={UID} --regid={UID} --clear-groups env -i PATH=/usr/bin:/bin {sys.executable} "
             f"{script} {secret} {d} {os.getpid()}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not os.path.exists(os.path.join(d, "new.txt"))
    assert out["caller_uid"] == UID and out["caller_reads_secret"] == "TOP-SECRET"  # the caller could read it
    for mode in ("full", "os_only"):
        iso = out[mode]
        assert (iso["network"], iso["filesystem"], iso["pids"], iso["ipc"]) == ("netns", "chroot", "pidns", "ipcns")
        assert iso["user"] == f"uid {UID} in a user namespace, no capabilities" and iso["no_new_privs"]
        assert iso["seccomp"].startswith("deny-list") or platform.machine() != "x86_64"
    assert "PermissionError: sandbox: reading" in out["full_read"]
    assert "PermissionError: sandbox: sending signals" in out["full_kill"]
    assert "FileNotFoundError" in out["read"][1] and "FileNotFoundError" in out["write"][1]
    # the same uid as the caller, yet neither the caller nor the test can be named from its PID namespace
    assert "ProcessLookupError" in out["kill_parent"][1] and "ProcessLookupError" in out["kill_caller"][1]
    # no chroot escape, no nested user namespace, no root, no mount
    assert out["native"][1] is None and out["native"][0].endswith(": (-1, -1, -1, -1)\n")
    assert "Operation not permitted" in out["connect"][1]  # seccomp: AF_UNIX sockets only (and no interface)
    assert "BlockingIOError" in out["fork"][1]
    assert out["libs"][1] is None and out["libs"][0].endswith(f": (3, {UID}, '/sandbox')\n")
