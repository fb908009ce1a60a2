"""Fake CPU devices for the multi-device benchmarks; must run before jax is first imported."""

from __future__ import annotations

import os
import sys


def emulate_cpu_devices(n: int) -> None:
    """Give XLA:CPU `n` host devices unless jax is already imported or XLA_FLAGS already sets a count.

    XLA reads the flag once, when the backend starts, so a benchmark module calls this at its top. On a
    machine with real accelerators set JAX_PLATFORMS yourself; this only defaults it to cpu.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
