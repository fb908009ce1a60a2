"""Toggle (Eq. 2): budgets, the phase schedule, the phase-0 indicator, and state round-trips."""

import json

import numpy as np
import pytest

from k25.rl.toggle import Toggle, ToggleConfig


def test_budget_is_percentile_of_correct_lengths():
    t = Toggle(ToggleConfig(rho=50.0))
    # correct lengths 10, 20, 30, 40 -> median 25; the wrong responses' lengths are ignored
    assert t.estimate([1, 1, 0, 1, 1, 0], [10, 20, 5, 30, 40, 1000]) == pytest.approx(25.0)
    assert Toggle(ToggleConfig(rho=0.0)).estimate([1, 1, 1], [7, 3, 9]) == 3.0
    assert Toggle(ToggleConfig(rho=100.0)).estimate([1, 1, 1], [7, 3, 9]) == 9.0
    # rho=75 on [10, 20, 30, 40]: numpy's linear interpolation, 30 + 0.25 * 10
    assert Toggle(ToggleConfig(rho=75.0)).estimate([1] * 4, [10, 20, 30, 40]) == pytest.approx(32.5)
    assert t.estimate([0, 0], [5, 6]) is None
    # continuous rewards: "correct" means r >= correct_threshold
    assert Toggle(ToggleConfig(rho=50.0, correct_threshold=0.8)).estimate([0.9, 0.5, 0.8], [10, 99, 30]) == 20.0


def test_phase_schedule():
    t = Toggle(ToggleConfig(m=3))
    assert [t.phase(s) for s in range(13)] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]


def test_apply_phase0_and_phase1():
    t = Toggle(ToggleConfig(rho=50.0, lam=0.5, m=2))
    rewards, lengths = [1, 1, 1, 0], [10, 20, 30, 40]
    # first sight fixes budget = median(10, 20, 30) = 20; mean accuracy 0.75 >= lambda: the budget applies
    np.testing.assert_array_equal(t.apply(0, "x", rewards, lengths), [1, 1, 0, 0])
    assert t.budgets["x"] == 20.0
    # phase 1 (steps 2, 3): rewards unchanged
    np.testing.assert_array_equal(t.apply(2, "x", rewards, lengths), rewards)
    # back in phase 0 the budget is the one fixed at the start, not re-estimated from the new group
    np.testing.assert_array_equal(t.apply(4, "x", [1, 1, 1, 1], [15, 25, 35, 45]), [1, 0, 0, 0])
    assert t.budgets["x"] == 20.0
    # mean accuracy below lambda: the constraint is off, long correct answers keep their reward
    np.testing.assert_array_equal(t.apply(4, "x", [1, 0, 0, 0], [90, 1, 1, 1]), [1, 0, 0, 0])
    # mean accuracy exactly lambda: "< lambda" is false, so the budget applies
    np.testing.assert_array_equal(t.apply(4, "x", [1, 1, 0, 0], [90, 5, 1, 1]), [0, 1, 0, 0])
    # a prompt whose first group had no correct response has no budget and is never constrained
    np.testing.assert_array_equal(t.apply(0, "y", [0, 0], [5, 5]), [0, 0])
    np.testing.assert_array_equal(t.apply(4, "y", [1, 1], [500, 600]), [1, 1])
    assert t.budgets["y"] is None


def test_disabled_is_identity_and_fit():
    t = Toggle(ToggleConfig(enabled=False))
    np.testing.assert_array_equal(t.apply(0, "x", [1, 1], [10, 1000]), [1, 1])
    t = Toggle(ToggleConfig(rho=50.0, lam=0.0))
    t.fit({"a": ([1, 1, 0], [4, 8, 2]), "b": ([0, 0], [3, 3])})
    assert t.budgets == {"a": 6.0, "b": None}
    np.testing.assert_array_equal(t.apply(0, "a", [1, 1], [6, 7]), [1, 0])


def test_state_round_trip_is_json():
    t = Toggle(ToggleConfig(rho=40.0, lam=0.3, m=5))
    t.apply(0, "p1", [1, 1, 0], [12, 30, 4])
    t.apply(0, "p2", [0, 0, 0], [1, 2, 3])
    state = json.loads(json.dumps(t.state_dict()))
    u = Toggle.from_state_dict(state)
    assert u.config == t.config and u.budgets == t.budgets
    for step in (0, 5, 10):
        np.testing.assert_array_equal(u.apply(step, "p1", [1, 1, 1], [10, 20, 30]),
                                      t.apply(step, "p1", [1, 1, 1], [10, 20, 30]))


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="rho"):
        ToggleConfig(rho=150.0)
    with pytest.raises(ValueError, match="lam"):
        ToggleConfig(lam=2.0)
    with pytest.raises(ValueError, match="m="):
        ToggleConfig(m=0)
    with pytest.raises(ValueError, match="lengths"):
        Toggle().apply(0, "x", [1, 1], [3])


@pytest.mark.slow
def test_a_prompt_pool_fits_toggle_budgets_once_before_training(tmp_path):
    """`rl.prompt_pool` = N: training cycles over the task stream's first N prompts, and with Toggle on their
    budgets are fitted once, from K responses of the starting policy per prompt, before the first step (Eq. 2's
    "estimated once at the beginning of training"); later groups never refit them and the fit survives a
    checkpoint of the iterator's state."""
    from experiments import rl_text
    from k25.train.loop import Trainer

    c = rl_text.get_config("smoke")
    c.mesh.devices = 1
    c.rl.prompt_pool, c.rl.toggle.enabled = 4, True  # 2 prompts per step (batch 8 / K 4): 2 steps an epoch
    t = Trainer(c, str(tmp_path))
    it = t.data_iterator()
    it.observe_state(t.init_state(), 0)
    next(it)
    pool_ids = {t.stage.task(i, c.seed).id for i in range(4)}
    assert it.toggle_fitted and set(it.toggle.budgets) == pool_ids
    assert it.host_metrics()["toggle_fitted_prompts"] == 4
    fitted = dict(it.toggle.budgets)
    next(it), next(it)  # into the second epoch: every training prompt is a pool prompt, no budget refitted
    assert it.toggle.budgets == fitted and "toggle_fitted_prompts" not in it.host_metrics()
    state = it.get_state()
    again = t.data_iterator()
    again.set_state(state)
    assert again.toggle_fitted and again.toggle.budgets == fitted
    c.rl.prompt_pool = 1
    with pytest.raises(ValueError, match="rl.prompt_pool=1"):
        Trainer(c, str(tmp_path / "bad"))
