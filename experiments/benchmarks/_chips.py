"""Published dense bf16 matmul peaks of accelerators, for MFU against the chip rather than a measured matmul.

Vendor datasheet figures without structured sparsity (NVIDIA quotes the sparse figure, twice these, first).
Matched case-insensitively against `jax.Device.device_kind`, most specific first; `--peak_flops` overrides.
"""

from __future__ import annotations

# (substring of device_kind, dense bf16 FLOP/s)
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),  # v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
)


def bf16_peak_flops(device_kind: str) -> float | None:
    """The table's dense bf16 peak of this device kind, or None (a CPU, or a chip not in the table)."""
    kind = device_kind.lower()
    for key, flops in BF16_PEAK_FLOPS:
        if key.lower() in kind:
            return flops
    return None
