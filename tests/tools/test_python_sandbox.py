"""The Python tool's behaviour as a tool: a persistent IPython-like session, images in and out, numpy/scipy,
truncation, replacement of a dead or hung process. The escape attempts are in test_python_escape.py."""

import asyncio
import os
import platform
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from k25.tools import PythonSandbox, PythonTool, Toolset
from k25.tools.sandbox_child import CappedOutput, world_readable


@pytest.fixture(scope="module")
def sb():
    grid = np.zeros((6, 8), np.uint8)
    grid[1:3, 1:3] = 255
    grid[4:6, 5:8] = 255
    with PythonSandbox(timeout_s=30, memory_mb=512, max_output_chars=400,
                       images={"image": Image.fromarray(grid).convert("RGB")}) as sandbox:
        yield sandbox


def test_state_persists_and_last_expression_is_shown(sb):
    r = sb.run("a = 20\nprint('hello')\nb = a + 1")
    assert (r.text, r.error, r.images) == ("hello\n", None, [])
    r = sb.run("def f(x):\n    return x * b\nf(2)")
    assert r.error is None and r.text.endswith("]: 42\n") and r.text.startswith("Out[")
    assert sb.run("_ + 1").text.endswith("]: 43\n")
    assert sb.run("x = None\nx").text == ""  # a None value is not shown, as in IPython


def test_output_streams_behave_like_files(sb):
    r = sb.run("import sys, warnings\nsys.stdout.writelines(['a', 'b\\n'])\nprint(sys.stdout.encoding)\n"
               "print('to stderr', file=sys.stderr)\nwarnings.warn('careful')\n"
               "import io\ntry:\n    sys.stdout.fileno()\nexcept io.UnsupportedOperation as e:\n    print('no fd:', e)")
    assert r.error is None, r.error
    assert r.text.startswith("ab\nutf-8\nto stderr\n") and "UserWarning: careful" in r.text
    assert r.text.endswith("no fd: captured output has no file descriptor\n")


def test_user_errors_are_tracebacks_of_the_cell(sb):
    r = sb.run("print('before')\n1 / 0")
    assert r.text == "before\n"
    assert r.error.startswith("Traceback (most recent call last):\n  File \"<cell-")
    assert "1 / 0" in r.error and r.error.endswith("ZeroDivisionError: division by zero")
    assert "sandbox_child" not in r.error
    r = sb.run("def broken(:\n  pass")
    assert "SyntaxError" in r.error and r.text == ""
    r = sb.run("raise SystemExit(3)")
    assert "SystemExit: 3" in r.error
    assert sb.run("a").text.endswith(": 20\n")  # the session survived all three


def test_numpy_scipy_pillow_on_the_bound_image(sb):
    code = textwrap.dedent("""
        import numpy as np
        from scipy import ndimage
        from PIL import Image, ImageOps
        arr = np.array(image.convert('L')) > 128
        labels, n = ndimage.label(arr)
        boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels)]
        (image.size, n, boxes, ImageOps.mirror(image).getpixel((1, 5)))
    """)
    r = sb.run(code)
    assert r.error is None, r.error
    assert r.text.split(": ", 1)[1] == "((8, 6), 2, [(1, 1, 3, 3), (4, 5, 6, 8)], (255, 255, 255))\n"


def test_images_come_back_from_display_and_last_expression(sb):
    r = sb.run(textwrap.dedent("""
        mask = np.array(image.convert('L')) > 128
        display(mask)                      # bool array -> L image
        display(np.zeros((2, 3, 3)) + 0.5) # float in [0, 1] -> RGB image
        display('not an image')
        image.crop((1, 1, 3, 3)).rotate(90)
    """))
    assert r.error is None, r.error
    assert "'not an image'" in r.text
    assert [(im.mode, im.size) for im in r.images] == [("L", (8, 6)), ("RGB", (3, 2)), ("RGB", (2, 2))]
    assert np.array(r.images[0])[1:3, 1:3].min() == 255 and np.array(r.images[0]).sum() == 255 * 10
    assert np.all(np.array(r.images[1]) == 128) and np.all(np.array(r.images[2]) == 255)
    assert isinstance(r.images[0], Image.Image)
    bad = sb.run("display(np.zeros((2, 2, 7)))")
    assert "display() takes a PIL image or an array" in bad.error


def test_matplotlib_figure_is_displayed_as_an_image(sb):
    r = sb.run("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
               "fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)\nax.pie([1, 2, 3])\ndisplay(fig)")
    assert r.error is None, r.error
    assert [(im.mode, im.size) for im in r.images] == [("RGB", (100, 75))]
    assert len(np.unique(np.array(r.images[0]).reshape(-1, 3), axis=0)) > 3  # background and the wedges' colours


def test_bind_images_later_and_image_caps():
    with PythonSandbox(timeout_s=30, memory_mb=512, max_images=2, max_image_pixels=100) as sb:
        sb.bind_images({"chart": np.full((4, 5, 3), 7, np.uint8)})
        r = sb.run("chart.size, chart.mode, chart.getpixel((0, 0))")
        assert r.text.endswith(": ((5, 4), 'RGB', (7, 7, 7))\n"), r
        r = sb.run("from PIL import Image\nfor i in range(3): display(Image.new('L', (20, 20), i))")
        assert [im.size for im in r.images] == [(10, 10), (10, 10)]
        assert "downscaled from 20x20 to 10x10" in r.text and "at most 2 images per call" in r.text
        with pytest.raises(ValueError, match="must be a Python identifier"):
            sb.bind_images({"not a name": np.zeros((2, 2), np.uint8)})
        with pytest.raises(ValueError, match="uint8 array"):
            sb.bind_images({"x": np.zeros((2, 2), np.float32)})


def test_long_output_is_truncated_and_says_so(sb):
    r = sb.run("for i in range(100000): print(i)")
    assert r.error is None
    assert len(r.text) < 600
    assert r.text.startswith("0\n1\n2\n") and r.text.endswith("99998\n99999\n")
    assert "[output truncated: 588890 characters in all;" in r.text


def test_capped_output_keeps_head_and_tail():
    out = CappedOutput(10)
    for piece in ["abc", "defgh", "ijklmnop", "qr", "stuvwxyz"]:
        out.write(piece)
    text = out.getvalue()
    assert text.startswith("abcde\n[output truncated: 26 characters in all; 16 omitted")
    assert text.endswith("\nvwxyz")
    small = CappedOutput(10)
    small.write("0123456789")
    assert small.getvalue() == "0123456789"


def test_crash_is_replaced_with_a_clear_error():
    with PythonSandbox(timeout_s=30, memory_mb=512) as sb:
        sb.run("keep = 1")
        pid = sb._proc.pid
        r = sb.run("import os; os._exit(5)")
        assert r.error.startswith("SandboxError: the Python process exited with code 5; the session was restarted")
        r = sb.run("import faulthandler; faulthandler._read_null()")  # the restarted process crashes too
        assert "terminated by SIGSEGV" in r.error
        r = sb.run("'keep' in globals()")
        assert r.text.startswith("[the Python session had stopped and was restarted")
        assert r.text.endswith(": False\n") and r.error is None
        assert sb.restarts == 2 and sb._proc.pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_hang_that_ignores_the_alarm_is_killed_by_the_parent():
    with PythonSandbox(timeout_s=1, memory_mb=512, kill_grace_s=1) as sb:
        sb.run("keep = 1")
        t0 = time.monotonic()
        r = sb.run("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nsignal.signal(signal.SIGXCPU, "
                   "signal.SIG_IGN)\nwhile True: pass")
        elapsed = time.monotonic() - t0
        assert r.error.startswith("TimeoutError: the code did not finish within the 1 s limit and was stopped")
        assert 1.9 < elapsed < 6, elapsed
        r = sb.run("'keep' in globals()")
        assert r.text.endswith(": False\n") and "restarted" in r.text


def test_isolation_report_and_unprivileged_imports(sb):
    iso = sb.isolation
    if os.geteuid() == 0:
        assert (iso["network"], iso["filesystem"], iso["user"][:4]) == ("netns", "chroot", "uid ")
        assert iso["no_new_privs"] and all(n.startswith("preloaded numpy") for n in iso["notes"])
        if platform.machine() == "x86_64":
            assert iso["seccomp"].startswith("deny-list of 39 system calls")
    assert iso["audit_hook"] and iso["limits"]["memory_mb"] == 512
    # modules nobody has imported yet in this process, loaded after the privilege drop from the read-only mounts
    r = sb.run("import os, json, PIL.ImageChops, scipy.ndimage, scipy.ndimage._ni_support\n"
               "(os.getuid() != 0, os.getcwd(), json.dumps([1]))")
    assert r.error is None, r.error
    assert r.text.endswith(f": (True, '{iso['workdir']}', '[1]')\n") or os.geteuid() != 0


def test_world_readable_check(tmp_path, monkeypatch):
    # The chroot bind-mounts the venv read-only; the unprivileged uid can import only what others may read,
    # so the child checks the promised packages and imports them before dropping privileges when they are not.
    pkg = tmp_path / "k25_probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    os.chmod(tmp_path, 0o755)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert world_readable("k25_probe_pkg") and world_readable("k25_probe_pkg.sub")
    os.chmod(pkg / "sub", 0o700)
    assert world_readable("k25_probe_pkg") and not world_readable("k25_probe_pkg.sub")
    os.chmod(pkg / "__init__.py", 0o600)
    assert not world_readable("k25_probe_pkg")
    assert not world_readable("a_module_that_does_not_exist")


def test_files_persist_within_the_private_workdir(sb):
    r = sb.run("with open('notes.txt', 'w') as f: f.write('kept')\nimport os; sorted(os.listdir('.'))")
    assert r.error is None and "notes.txt" in r.text
    assert sb.run("open('notes.txt').read()").text.endswith(": 'kept'\n")


def test_bad_arguments_and_closed_sandbox():
    with pytest.raises(ValueError, match="timeout_s > 0"):
        PythonSandbox(timeout_s=0)
    with pytest.raises(ValueError, match="would not isolate anything"):
        PythonSandbox(os_isolation=False, audit_hook=False)
    sb = PythonSandbox(timeout_s=30, memory_mb=512)
    assert sb.run(123).error == "code must be a string, got int"
    sb.run("1")
    pid = sb._proc.pid
    sb.close()
    assert sb.run("1").error == "the Python sandbox is closed"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_python_tool_through_a_toolset(sb):
    tools = Toolset([PythonTool(sb)])
    decl = tools.schemas()[0]["function"]
    assert decl["name"] == "python" and decl["parameters"]["required"] == ["code"]
    assert "image" in decl["description"] and "no network" in decl["description"]

    async def episode():
        first = await tools.call("python", '{"code": "z = 6 * 7\\nz"}')
        second = await tools.dispatch({"function": {"name": "python", "arguments": '{"code": "z + 1"}'}})
        wrong = await tools.call("python", '{"source": "1"}')
        return first, second, wrong

    first, second, wrong = asyncio.run(episode())
    assert first.text.endswith(": 42\n") and second.text.endswith(": 43\n")
    assert "'code' is a required property" in wrong.error


def test_sandbox_dies_with_its_parent(tmp_path):
    # The parent exits without closing the sandbox; the child must not outlive it (its lifeline pipe closes).
    script = textwrap.dedent("""
        import os
        from k25.tools import PythonSandbox
        sb = PythonSandbox(timeout_s=30, memory_mb=512)
        sb.start()
        print(sb._proc.pid, sb._tmp, flush=True)
        sb.run("import time")
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pid, scratch = out.stdout.split()
    pid = int(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # a zombie: exited, waiting to be reaped by init
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"sandbox process {pid} outlived its parent")
    if os.geteuid() == 0:  # with a PID namespace the sandbox's waiter removes its scratch directory
        assert not os.path.exists(scratch)


@pytest.mark.parametrize("kwargs", [{}, {"audit_hook": False}, {"os_isolation": False}],
                         ids=["full", "os_only", "hook_only"])
def test_promised_libraries_import_in_every_mode(kwargs):
    with PythonSandbox(timeout_s=60, memory_mb=512, **kwargs) as sb:
        r = sb.run("import numpy as np, scipy.ndimage as ndi\nfrom PIL import Image\n"
                   "int(ndi.binary_dilation(np.eye(4, dtype=bool)).sum()), Image.new('L', (2, 2)).size")
        assert r.error is None and r.text.endswith(": (10, (2, 2))\n"), r
        iso = sb.isolation
        if kwargs.get("os_isolation") is False:  # what a kernel without namespaces gets, reported as such
            assert (iso["network"], iso["filesystem"], iso["user"], iso["pids"], iso["ipc"]) == (
                "audit-hook", "audit-hook", "unchanged", "shared", "shared")
        assert iso["audit_hook"] is kwargs.get("audit_hook", True)


def test_concurrent_episodes_have_separate_sessions():
    tools = [PythonTool(timeout_s=30, memory_mb=512) for _ in range(3)]
    try:
        async def episode(i, tool):
            await tool.call({"code": f"import time\nmine = {i}\ntime.sleep(0.2)"})
            return await tool.call({"code": "mine, sorted(os.listdir('.')) if 'os' in dir() else []"})

        async def main():
            return await asyncio.gather(*(episode(i, t) for i, t in enumerate(tools)))

        results = asyncio.run(main())
        assert [r.text.split(": ", 1)[1] for r in results] == ["(0, [])\n", "(1, [])\n", "(2, [])\n"]
        if os.geteuid() == 0:
            assert len({t.sandbox.isolation["user"] for t in tools}) == 3  # one uid each
    finally:
        for t in tools:
            t.close()
