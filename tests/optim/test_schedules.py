"""Learning-rate schedules: values at the phase boundaries and midpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25.optim.schedules import constant, make_schedule, warmup_cosine, wsd


def at(schedule, step: int) -> float:
    return float(schedule(jnp.asarray(step, jnp.int32)))


def test_warmup_cosine_key_steps():
    s = warmup_cosine(1e-3, warmup_steps=10, total_steps=110, final_ratio=0.1)
    np.testing.assert_allclose(at(s, 0), 0.0, atol=1e-12)
    np.testing.assert_allclose(at(s, 5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(at(s, 10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(at(s, 60), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # cosine midpoint
    t = 35  # a quarter into the decay
    np.testing.assert_allclose(at(s, t), 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100))), rtol=1e-5)
    np.testing.assert_allclose(at(s, 110), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(at(s, 500), 1e-4, rtol=1e-5)


def test_warmup_cosine_without_warmup():
    s = warmup_cosine(2.0, warmup_steps=0, total_steps=100, final_ratio=0.0)
    np.testing.assert_allclose(at(s, 0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(at(s, 50), 1.0, rtol=1e-5)
    np.testing.assert_allclose(at(s, 100), 0.0, atol=1e-6)


def test_wsd_key_steps():
    s = wsd(1e-3, warmup_steps=10, total_steps=100, decay_fraction=0.2, final_ratio=0.1)
    np.testing.assert_allclose(at(s, 0), 0.0, atol=1e-12)
    np.testing.assert_allclose(at(s, 5), 5e-4, rtol=1e-6)
    for step in (10, 40, 79, 80):  # stable through the start of the decay
        np.testing.assert_allclose(at(s, step), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(at(s, 90), 1e-3 * 0.55, rtol=1e-5)  # linear midpoint between 1 and 0.1
    np.testing.assert_allclose(at(s, 100), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(at(s, 1000), 1e-4, rtol=1e-5)


def test_wsd_cosine_decay_and_edge_phases():
    s = wsd(1.0, warmup_steps=0, total_steps=100, decay_fraction=0.5, final_ratio=0.0, decay_shape="cosine")
    np.testing.assert_allclose(at(s, 0), 1.0)
    np.testing.assert_allclose(at(s, 50), 1.0)
    np.testing.assert_allclose(at(s, 75), 0.5, rtol=1e-5)
    np.testing.assert_allclose(at(s, 100), 0.0, atol=1e-6)
    no_decay = wsd(1.0, warmup_steps=4, total_steps=10, decay_fraction=0.0)
    np.testing.assert_allclose([at(no_decay, t) for t in (0, 2, 4, 10, 50)], [0, 0.5, 1, 1, 1], rtol=1e-6)
    no_stable = wsd(1.0, warmup_steps=5, total_steps=10, decay_fraction=0.5)
    np.testing.assert_allclose([at(no_stable, t) for t in (5, 6, 10)], [1.0, 0.8, 0.0], rtol=1e-5,
                               atol=1e-6)  # float32 values of size 1: 1e-6 is 8 ULPs


def test_constant_and_dispatch():
    np.testing.assert_allclose([at(constant(3.0, warmup_steps=3), t) for t in (0, 3, 99)], [0.0, 3.0, 3.0])
    a = make_schedule("wsd", peak_lr=1.0, warmup_steps=2, total_steps=20)
    b = wsd(1.0, 2, 20)
    for t in range(0, 25, 3):
        assert at(a, t) == at(b, t)
    c = make_schedule("warmup_cosine", peak_lr=1.0, warmup_steps=2, total_steps=20, final_ratio=0.5)
    np.testing.assert_allclose(at(c, 20), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", peak_lr=1.0)


def test_schedules_jit_and_validation():
    s = jax.jit(wsd(1.0, 10, 100))
    np.testing.assert_allclose(float(s(jnp.asarray(5))), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(1.0, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="inside the warmup"):
        wsd(1.0, warmup_steps=50, total_steps=100, decay_fraction=0.6)
    with pytest.raises(ValueError, match="decay_shape"):
        wsd(1.0, 1, 10, decay_shape="exp")
