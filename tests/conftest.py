"""Test process setup: 8 fake CPU devices and float32 matmuls, before jax is imported anywhere."""

import hashlib
import os
import platform


def _host_tag() -> str:
    """The CPU's architecture and feature flags, hashed: XLA:CPU code is built for them, and jax's cache key does
    not cover them, so a cache shared between machines (a network home) keeps one directory per kind of CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + platform.processor() + flags).encode()).hexdigest()[:12]


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests, and the CLI subprocesses and notebook kernels they start (which inherit this environment), compile the
# same smoke programs; JAX's persistent cache compiles each once. Its key covers the program, the XLA flags and the
# jax version, so a hit is the executable a fresh compile would give. The size cap turns on LRU eviction and the file
# lock that the parallel test workers need. Set JAX_COMPILATION_CACHE_DIR to move it, or to "" to compile every time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "jax-tests", _host_tag()))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
