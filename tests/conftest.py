"""Test process setup: 8 fake CPU devices and float32 matmuls, before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests, and the CLI subprocesses and notebook kernels they start (which inherit this environment), compile the
# same smoke programs; JAX's persistent cache compiles each once. Its key covers the program, the XLA flags and the
# jax version, so a hit is the executable a fresh compile would give. The size cap turns on LRU eviction and the file
# lock that the parallel test workers need. Set JAX_COMPILATION_CACHE_DIR to move it, or to "" to compile every time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "jax-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
