"""The vision schedule of the joint stage (k25.data.mixture.VisionSchedule): equal text and vision totals across
the early-fusion arms, no vision before the injection point, and token counters that resume exactly."""

import numpy as np
import pytest

from experiments import early_fusion
from k25.data.mixture import VisionSchedule, injection_for_budget
from k25.train.joint import JointStage


def arm_schedule(arm: str, total_steps: int, batch_size: int) -> VisionSchedule:
    ratio = early_fusion.ARMS[arm]
    return VisionSchedule.from_config(ratio, injection_for_budget(early_fusion.VISION_SHARE, ratio), total_steps,
                                      batch_size)


@pytest.mark.parametrize("total_steps,batch_size", [(10, 8), (250, 16), (300, 16), (1000, 7)])
def test_arms_have_equal_totals_and_start_vision_at_their_injection_point(total_steps, batch_size):
    rows = total_steps * batch_size
    totals = {}
    for arm, inject in (("early", 0.0), ("mid", 0.5), ("late", 0.8)):
        s = arm_schedule(arm, total_steps, batch_size)
        assert s.inject_step == round(inject * total_steps)  # the report's 0 % / 50 % / 80 %
        flags = np.stack([s.vision_rows(i) for i in range(total_steps)])
        assert not flags[:s.inject_step].any()  # never vision before the injection point
        # the report's budget: ratio x (1 - inject) x N = VISION_SHARE x N vision rows, counted row by row
        assert flags.sum() == int(early_fusion.VISION_SHARE * rows + 1e-9) == s.totals()[1]
        assert s.totals()[0] == rows - flags.sum()
        for step in (0, s.inject_step, total_steps // 3, total_steps):
            assert s.rows_through(step)[1] == flags[:step].sum()
        after = flags[s.inject_step:].reshape(-1)
        # spread evenly: any 1/ratio consecutive rows after the injection hold at most one more than ratio x n
        window = round(1 / early_fusion.ARMS[arm])
        counts = np.convolve(after.astype(int), np.ones(window, int), "valid")
        assert counts.max() <= 1 + 1e-9 and counts.min() >= 0
        totals[arm] = s.totals()
    assert len(set(totals.values())) == 1, totals


def test_injection_for_budget_and_bad_fields_are_refused():
    assert [injection_for_budget(0.1, r) for r in (0.1, 0.2, 0.5)] == pytest.approx([0.0, 0.5, 0.8])
    with pytest.raises(ValueError, match="vision_share"):
        injection_for_budget(0.3, 0.2)
    with pytest.raises(ValueError, match="config.data.vision_ratio"):
        VisionSchedule.from_config(1.5, 0.0, 10, 8)
    with pytest.raises(ValueError, match="config.data.inject_at"):
        VisionSchedule.from_config(0.5, 1.0, 10, 8)
    with pytest.raises(ValueError, match="whole step"):
        VisionSchedule.from_config(0.5, 0.55, 10, 8)


def smoke_config(arm: str):
    c = early_fusion.get_config(f"{arm},smoke")
    c.mesh.devices = 1
    c.data.read_threads = 1
    return c


def test_stage_batches_follow_the_schedule_and_text_rows_must_be_zero():
    stage = JointStage(smoke_config("mid"))
    s, media_id = stage.schedule, stage.tokenizer.media_id
    assert s.inject_step == 5
    for index in (0, 4, 5, 9):
        raw = stage.data.raw_batch(0, "train", index, stage.config.batch_size, s.vision_rows(index))
        rows_with_media = (raw["input_ids"] == media_id).any(axis=1)
        np.testing.assert_array_equal(rows_with_media, s.vision_rows(index))
        assert ("pixel_values" in raw) == bool(rows_with_media.any())
    c = smoke_config("mid")
    c.data.text_rows = 1
    with pytest.raises(ValueError, match="text_rows"):
        JointStage(c)


def test_token_counts_resume_exactly_from_the_iterator_state():
    stage = JointStage(smoke_config("late"))  # vision from step 8 of 10
    it = stage.train_iterator(0, 0, 1)
    for _ in range(8):
        next(it)
    state = it.get_state()
    assert state["tokens/vision"] == 0 and state["tokens/text"] == 8 * 8 * 96
    first = next(it)
    resumed = stage.train_iterator(0, 0, 1)
    resumed.set_state(state)
    again = next(resumed)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert resumed.host_metrics() == it.host_metrics()
    text, vision = stage.schedule.rows_through(9)
    assert it.host_metrics() == {"tokens/text": text * 96, "tokens/vision": vision * 96} and vision > 0
    with pytest.raises(ValueError, match="token counts"):
        resumed.set_state(state["iterator"])
