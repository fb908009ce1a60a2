"""`config.rl.drop_uniform_groups` (DAPO's dynamic sampling): groups whose K rewards are all equal never reach
the batch, are counted, and the iterator keeps sampling until the batch is full; off, the batch is unchanged.
The rollouts are scripted (no sampler), so this runs in well under a second after the stage is built."""

import numpy as np

from experiments import rl_text
from k25.rl.rollout import Episode, IterationResult
from k25.rl.trainer import RLIterator, RLStage


def _group(name: str, rewards: list[float], token: int) -> list[Episode]:
    """A complete group; each member's response is (token, token + k) so rows can be told apart."""
    return [
        Episode(
            uid=f"{name}/{k}",
            group=name,
            task={"id": name},
            seed=0,
            started=0,
            prompt_ids=[1, 2],
            ids=[token, token + k],
            logprobs=[-0.5, -0.25],
            mask=[1, 1],
            versions=[0, 0],
            status="done",
            reward=r,
        )
        for k, r in enumerate(rewards)
    ]


class ScriptedManager:
    """Stands in for the RolloutManager: iteration i completes the groups script[i] (then nothing uniform)."""

    def __init__(self, script):
        self.script, self.calls, self.version = list(script), 0, 0

    async def run_iteration(self, tasks, iteration):
        groups = self.script[self.calls] if self.calls < len(self.script) else self.script[-1]
        self.calls += 1
        return IterationResult([[Episode(**vars(e)) for e in g] for g in groups], [], [], [], {})


def _iterator(script, drop: bool, cap: int = 32) -> RLIterator:
    c = rl_text.get_config("smoke")  # K = 4, batch 8: two groups per batch, two prompts per iteration
    c.mesh.devices = 1
    c.rl.drop_uniform_groups = drop
    c.rl.max_iterations_per_step = cap
    it = RLIterator(RLStage(c), seed=0)
    it.manager = ScriptedManager(script)
    return it


ALL_RIGHT = _group("all_right", [1.0, 1.0, 1.0, 1.0], 100)
ALL_WRONG = _group("all_wrong", [0.0, 0.0, 0.0, 0.0], 110)
LONE = _group("lone", [1.0], 120)  # the other three members failed: one reward is uniform too
MIXED_A = _group("mixed_a", [1.0, 0.0, 0.0, 0.0], 130)
MIXED_B = _group("mixed_b", [0.0, 1.0, 1.0, 0.5], 140)
MIXED_C = _group("mixed_c", [0.0, 0.0, 1.0, 1.0], 150)


def _rows(batch) -> list[tuple[int, int]]:
    """The response tokens of each filled row."""
    return [tuple(batch["targets"][r, 1:3]) for r in range(len(batch["targets"])) if batch["loss_mask"][r].any()]


def test_off_keeps_uniform_groups_in_the_batch():
    it = _iterator([[ALL_RIGHT, MIXED_A], [ALL_WRONG, MIXED_B]], drop=False)
    batch = next(it)
    assert it.manager.calls == 1
    assert _rows(batch) == [(100, 100 + k) for k in range(4)] + [(130, 130 + k) for k in range(4)]
    np.testing.assert_array_equal(batch["advantages"][:4], 0.0)  # the uniform group: zero advantage, N counts it
    assert batch["n_total"][0] == 16
    m = it.host_metrics()
    assert "dropped_uniform_groups" not in m and m["batch_fill"] == 1.0


def test_on_drops_uniform_groups_and_keeps_sampling():
    it = _iterator([[ALL_RIGHT, MIXED_A], [ALL_WRONG, LONE], [MIXED_B, MIXED_C]], drop=True)
    batch = next(it)
    assert it.manager.calls == 3  # two iterations yielded one useful group between them: a third was needed
    assert _rows(batch) == [(130, 130 + k) for k in range(4)] + [(140, 140 + k) for k in range(4)]
    m = it.host_metrics()
    assert m["dropped_uniform_groups"] == 3 and m["rollout_iterations"] == 3 and m["batch_fill"] == 1.0
    assert m["reward"] == np.mean([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    # the kept groups are laid out exactly as the iterator with the field off lays out the same groups
    ref = next(_iterator([[MIXED_A, MIXED_B]], drop=False))
    for k in batch:
        np.testing.assert_array_equal(batch[k], ref[k], err_msg=k)
    assert np.abs(batch["advantages"]).sum() > 0
    # the non-uniform group left over waits in the buffer for the next step, as without the field
    assert [g[0].group for g in it.buffer] == ["mixed_c"]
    nxt = next(it)
    assert _rows(nxt)[:4] == [(150, 150 + k) for k in range(4)]


def test_on_lays_out_a_part_filled_batch_when_every_group_is_uniform():
    it = _iterator([[ALL_RIGHT, ALL_WRONG]], drop=True, cap=3)
    batch = next(it)
    assert it.manager.calls == 3 and not batch["loss_mask"].any()
    m = it.host_metrics()
    assert m["dropped_uniform_groups"] == 6 and m["rollout_iterations"] == 3 and m["batch_fill"] == 0.0
