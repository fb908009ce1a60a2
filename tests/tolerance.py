"""Tolerances for values that come out of sums of larger terms.

An element of a gradient, an optimizer update or a parameter delta is formed from quantities much larger
than itself (cancellation), so its float32 rounding is set by those quantities, not by the element. A fixed
elementwise `atol` below that floor makes a test pass or fail with the CPU's summation order (AVX-512 and
AVX2 kernels add in different orders). These helpers put the absolute floor at a few float32 epsilons of
the magnitude the values came from, and keep the relative tolerance as it was.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one unit in the last place of 1.0


def assert_close_at_scale(actual, desired, *, rtol: float, scale: float | None = None, ulps: float = 16,
                          err_msg: str = "") -> None:
    """`assert_allclose` with `atol = ulps * EPS32 * scale`; `scale` defaults to max |desired| (for a gradient
    leaf: its largest entry, the size of the terms its small entries cancel down from)."""
    desired = np.asarray(desired)
    if scale is None:
        scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=ulps * EPS32 * scale, err_msg=err_msg)


def assert_same_delta(new, other, old, *, rtol: float = 1e-5) -> None:
    """Two updates of the same parameter agree: `new - old` vs `other - old`.

    Each delta is read back from a float32 parameter, so it is exact only to half a unit in the last place of
    the parameter itself (1.19e-7 for entries near 1.0, however small the delta): the floor is 2 ULPs of the
    largest parameter entry, on top of `rtol` of the largest delta.
    """
    new, other, old = (np.asarray(x, np.float32) for x in (new, other, old))
    delta, ref = new - old, other - old
    ulp_floor = 2 * EPS32 * float(max(np.max(np.abs(new)), np.max(np.abs(other)), np.max(np.abs(old))))
    err = float(np.max(np.abs(delta - ref))) if delta.size else 0.0
    bound = rtol * float(np.max(np.abs(ref)) if ref.size else 0.0) + ulp_floor
    assert err <= bound, f"deltas differ by {err:.3g} > {bound:.3g} (rtol {rtol} of max |delta| + 2 ULPs of the parameter)"
