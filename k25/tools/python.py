"""The sandboxed Python tool: a persistent IPython-like session per episode in a separate, isolated process.

Model-written code runs only here. `PythonSandbox` owns one child process (`sandbox_child.py`) and talks to it
over pipes with a JSON + raw-bytes framing (never pickle: nothing the child sends is executed here). The child
isolates itself before running any user code; which layers are in force is reported in `.isolation` (see the
threat model in BUILD_NOTES.md, "Tools"). The parent enforces the hard wall-time limit: if no answer arrives
within `timeout_s + kill_grace_s`, the child is killed and a fresh one replaces it at the next call, so the
caller never hangs and always gets a `ToolResult`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from k25.tools.base import Tool, ToolResult
from k25.tools.sandbox_child import ProtocolError, recv_msg, send_msg

log = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
# The child's whole environment: nothing from the parent's (its secrets stay out); one BLAS thread (the
# sandbox may not create threads).
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


class SandboxStartError(RuntimeError):
    """The sandbox process could not be started or failed to isolate itself."""


def _as_image(name: str, img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode in _MODES else img.convert("RGBA" if "A" in img.getbands() else "RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"image {name!r}: expected a PIL image or a uint8 array of shape (H, W), (H, W, 3) or "
                         f"(H, W, 4), got dtype {arr.dtype} shape {arr.shape}")
    return Image.fromarray(arr)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped unexpectedly"
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        why = {"SIGKILL": " (killed: its CPU-time budget or the memory ran out)", "SIGXCPU": " (CPU-time limit)",
               "SIGSEGV": " (crashed)", "SIGABRT": " (aborted)", "SIGBUS": " (crashed)"}.get(sig, "")
        return f"was terminated by {sig}{why}"
    return f"exited with code {code}"


class PythonSandbox:
    """One persistent, isolated Python session.

    timeout_s: wall-time limit per `run` (the child interrupts the code and keeps its state; if it does not
        answer within `kill_grace_s` more, it is killed and replaced).
    memory_mb: the child's address-space limit (RLIMIT_AS). disk_mb: size of its work directory / file size limit.
    cpu_budget_s: CPU seconds for the whole session (default 60 x timeout_s); each run gets at most timeout_s.
    images: input images bound as variables, {name: PIL image or uint8 array}; kept across restarts.
    max_output_chars / max_images / max_image_pixels: caps on what one call returns.
    os_isolation / audit_hook / seccomp: the defence layers (seccomp is part of the OS isolation); all on by
        default (turning one off is for tests that check the others hold on their own).
    """

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, *, disk_mb: int = 64,
                 cpu_budget_s: float | None = None, images: Mapping[str, Any] | None = None,
                 max_output_chars: int = 8000, max_images: int = 8, max_image_pixels: int = 2048 * 2048,
                 os_isolation: bool = True, audit_hook: bool = True, seccomp: bool = True, kill_grace_s: float = 3.0,
                 startup_timeout_s: float = 60.0):
        if timeout_s <= 0 or memory_mb < 128 or disk_mb < 1:
            raise ValueError(f"PythonSandbox needs timeout_s > 0, memory_mb >= 128 and disk_mb >= 1; got "
                             f"timeout_s={timeout_s}, memory_mb={memory_mb}, disk_mb={disk_mb}")
        if not os_isolation and not audit_hook:
            raise ValueError("PythonSandbox with os_isolation=False and audit_hook=False would not isolate anything")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_output_chars = int(max_output_chars)
        self._config = {"memory_mb": int(memory_mb), "disk_mb": int(disk_mb),
                        "cpu_budget_s": int(cpu_budget_s or max(60.0, 60 * timeout_s)),
                        "max_output_chars": int(max_output_chars), "max_images": int(max_images),
                        "max_image_pixels": int(max_image_pixels), "os_isolation": bool(os_isolation),
                        "audit_hook": bool(audit_hook), "seccomp": bool(seccomp)}
        self._images: dict[str, Image.Image] = {}
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._fds: tuple[int, int, int] | None = None  # request write end, response read end, lifeline write end
        self._tmp: str | None = None
        self._closed = False
        self.isolation: dict[str, Any] = {}
        self.restarts = 0
        self._lost_state = False
        self._answered: collections.deque[str] = collections.deque(maxlen=8)  # ids of the last calls answered
        if images:
            self.bind_images(images)

    # lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> PythonSandbox:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child now (otherwise the first `run` does). Raises SandboxStartError on failure."""
        with self._lock:
            if self._closed:
                raise SandboxStartError("this PythonSandbox is closed")
            if not self.alive:
                self._spawn()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._kill()

    def _spawn(self) -> None:
        self._kill()
        self._tmp = tempfile.mkdtemp(prefix="k25-sandbox-")
        root_dir, host_work = os.path.join(self._tmp, "root"), os.path.join(self._tmp, "work")
        os.mkdir(root_dir)
        os.mkdir(host_work, 0o700)
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        life_r, life_w = os.pipe()
        stderr = tempfile.TemporaryFile(dir=self._tmp)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-B", _CHILD, str(req_r), str(resp_w)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=dict(_ENV),
                cwd=self._tmp, pass_fds=(req_r, resp_w, life_r), start_new_session=True, close_fds=True)
        except OSError as e:
            for fd in (req_r, req_w, resp_r, resp_w, life_r, life_w):
                os.close(fd)
            stderr.close()
            raise SandboxStartError(f"could not start {sys.executable}: {e}") from None
        for fd in (req_r, resp_w, life_r):
            os.close(fd)
        self._fds = (req_w, resp_r, life_w)
        if os.geteuid() == 0 and self._config["os_isolation"]:
            # the fallback without a chroot works in this host directory as the sandbox's own uid
            uid = 1_000_000_000 + self._proc.pid
            for path in (self._tmp, host_work):
                os.chown(path, uid, uid)
        config = dict(self._config, root_dir=root_dir, host_workdir=host_work, lifeline_fd=life_r,
                      uid=1_000_000_000 + self._proc.pid, inherited_fds=(req_r, resp_w, life_r))
        try:
            send_msg(req_w, {"op": "init", "config": config})
            header, _ = recv_msg(resp_r, deadline=time.monotonic() + self.startup_timeout_s, max_header=1 << 20)
        except (OSError, ProtocolError, TimeoutError) as e:
            detail = self._stderr_tail(stderr)
            self._kill()
            raise SandboxStartError(f"the sandbox process did not start ({type(e).__name__}: {e})"
                                    + (f"; its stderr ends with:\n{detail}" if detail else "")) from None
        finally:
            stderr.close()
        if header.get("op") != "ready":
            self._kill()
            raise SandboxStartError(f"the sandbox could not isolate itself: {header.get('error', header)}")
        self.isolation = header["isolation"]
        degraded = [k for k, v in (("network", "audit-hook"), ("filesystem", "audit-hook"), ("user", "unchanged"),
                                   ("pids", "shared")) if self.isolation.get(k) == v]
        if degraded and self._config["os_isolation"]:
            log.warning("python sandbox runs with reduced OS isolation (%s left to the audit hook): %s",
                        ", ".join(degraded), "; ".join(self.isolation.get("notes", [])))
        if self._images:
            self._send_images(self._images)

    @staticmethod
    def _stderr_tail(f) -> str:
        try:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:  # not reaped yet, so the group id cannot belong to anyone else
                try:  # its process group: the waiter and the sandbox inside its PID namespace
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("sandbox process %d did not exit after SIGKILL", proc.pid)
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # images -------------------------------------------------------------------------------------------
    def bind_images(self, images: Mapping[str, Any]) -> None:
        """Bind input images as variables (PIL images inside the session), now and after any restart."""
        converted = {}
        for name, img in images.items():
            if not (isinstance(name, str) and name.isidentifier()) or name in ("display", "_"):
                raise ValueError(f"image name {name!r} must be a Python identifier other than 'display' and '_'")
            converted[name] = _as_image(name, img)
        with self._lock:
            self._images.update(converted)
            if self.alive:
                self._send_images(converted)

    def _send_images(self, images: Mapping[str, Image.Image]) -> None:
        specs = [{"name": n, "mode": im.mode, "size": list(im.size)} for n, im in images.items()]
        try:
            send_msg(self._fds[0], {"op": "bind", "images": specs}, [im.tobytes() for im in images.values()])
            header, _ = recv_msg(self._fds[1], deadline=time.monotonic() + self.timeout_s + self.kill_grace_s,
                                 max_header=1 << 20)
        except (OSError, ProtocolError, TimeoutError) as e:
            self._kill()
            raise SandboxStartError(f"binding images failed: {type(e).__name__}: {e}") from None
        if header.get("error"):
            raise SandboxStartError(f"binding images failed: {header['error']}")

    def _decode_images(self, specs: Any, blobs: list[bytes]) -> list[Image.Image]:
        if not isinstance(specs, list) or len(specs) != len(blobs) or len(specs) > self._config["max_images"]:
            raise ProtocolError("image list does not match its blobs or the image cap")
        out = []
        for spec, data in zip(specs, blobs):
            mode, size = spec.get("mode"), spec.get("size")
            if (mode not in _MODES or not isinstance(size, list) or len(size) != 2
                    or not all(isinstance(v, int) and v > 0 for v in size)
                    or size[0] * size[1] > self._config["max_image_pixels"]
                    or len(data) != size[0] * size[1] * _MODES[mode]):
                raise ProtocolError(f"malformed image {spec!r}")
            out.append(Image.frombytes(mode, tuple(size), data))
        return out

    # running ------------------------------------------------------------------------------------------
    def run(self, code: str) -> ToolResult:
        """Run one cell. Never raises for anything the code does; the caller never waits longer than about
        timeout_s + kill_grace_s (plus a restart when the previous call killed the process)."""
        if not isinstance(code, str):
            return ToolResult(error=f"code must be a string, got {type(code).__name__}")
        with self._lock:
            if self._closed:
                return ToolResult(error="the Python sandbox is closed")
            notes = []
            if not self.alive:
                if self._proc is not None or self._lost_state:
                    notes.append("[the Python session had stopped and was restarted: earlier variables are gone]")
                    self.restarts += 1
                try:
                    self._spawn()
                except SandboxStartError as e:
                    return ToolResult(error=f"the Python sandbox could not start: {e}")
                self._lost_state = False
            result = self._run_alive(code)
            if notes:
                result.text = "\n".join(notes + ([result.text] if result.text else []))
            return result

    def _run_alive(self, code: str) -> ToolResult:
        req_w, resp_r, _ = self._fds
        deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
        cap = 24 * self.max_output_chars + (1 << 20)  # text + error, JSON-escaped (up to 12 bytes a character)
        call_id = os.urandom(8).hex()  # the answer must echo it: a reply forged by the cell is told apart
        try:
            send_msg(req_w, {"op": "run", "id": call_id, "code": code, "timeout_s": self.timeout_s})
            for _ in range(4):  # skip the real answer to an earlier call that a forged reply had preceded
                header, blobs = recv_msg(resp_r, deadline=deadline, max_header=cap,
                                         max_blobs=self._config["max_images"] * self._config["max_image_pixels"] * 4)
                if header.get("id") not in self._answered:
                    break
            if header.get("op") != "result" or header.get("id") != call_id:
                raise ProtocolError("a reply that does not answer this call")
            self._answered.append(call_id)
            images = self._decode_images(header.get("images", []), blobs)
            text, error = header.get("text", ""), header.get("error")
            if not isinstance(text, str) or not (error is None or isinstance(error, str)):
                raise ProtocolError("text/error of the wrong type")
            # valid UTF-8 for the tokenizer: lone surrogates (print('\ud800')) become '?'
            text = text.encode("utf-8", "replace").decode("utf-8")
            error = None if error is None else error.encode("utf-8", "replace").decode("utf-8")
            if header.get("restart"):  # the session's CPU budget is spent: the child exits after answering
                self._restart_later()
            elif select.select([resp_r], [], [], 0)[0]:  # more bytes than one answer: the cell wrote to the pipe
                self._restart_later()
                text += ("\n" if text else "") + "[the Python session wrote to the tool's own pipe and was restarted]"
            return ToolResult(text=text, images=images, error=error)
        except TimeoutError:
            self._restart_later()
            return ToolResult(error=f"TimeoutError: the code did not finish within the {self.timeout_s:g} s limit and "
                                    "was stopped; the Python session was restarted, so earlier variables are gone")
        except (OSError, ProtocolError) as e:
            closed = isinstance(e, OSError) or str(e) == "pipe closed"  # it died (or closed its end) mid-call
            proc = self._proc
            try:
                code_ = proc.wait(timeout=5 if closed else 0.1) if proc is not None else None
            except subprocess.TimeoutExpired:
                code_ = None
            why = _describe_exit(code_) if closed else f"broke the tool protocol ({e})"
            self._restart_later()
            return ToolResult(error=f"SandboxError: the Python process {why}; the session was restarted, so "
                                    "earlier variables are gone")

    def _restart_later(self) -> None:
        self._kill()
        self._lost_state = True


class PythonTool(Tool):
    """The `python` tool the model calls: one `PythonSandbox` per episode (make one PythonTool per episode)."""

    name = "python"
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "Python code to run in the persistent session"}},
        "required": ["code"],
        "additionalProperties": False,
    }

    def __init__(self, sandbox: PythonSandbox | None = None, **sandbox_kwargs: Any):
        if sandbox is not None and sandbox_kwargs:
            raise ValueError("pass either a PythonSandbox or its keyword arguments, not both")
        self.sandbox = sandbox if sandbox is not None else PythonSandbox(**sandbox_kwargs)

    @property
    def description(self) -> str:
        names = ", ".join(self.sandbox._images) or "none"
        return ("Run Python code in a persistent, isolated IPython-like session (variables persist between calls). "
                "numpy, PIL (Pillow) and scipy.ndimage are available; there is no network access. Input images are "
                f"bound as PIL images named: {names}. Call display(x) on a PIL image, a numpy array or a matplotlib "
                "figure to see it; "
                "the value of a final expression is shown. Output is truncated when long. "
                f"Each call may run for {self.sandbox.timeout_s:g} s with {self.sandbox.memory_mb} MB of memory.")

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        return await asyncio.to_thread(self.sandbox.run, arguments["code"])

    def close(self) -> None:
        self.sandbox.close()
