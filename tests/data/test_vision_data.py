"""k25.data.vision: determinism, the held-out split, what the captions claim, encoding and resumable batches."""

import numpy as np
import pytest

from k25.data.preprocess import preprocess_images
from k25.data.tokenizer import load_tokenizer
from k25.data.vision import VisionTextData, default_vision_data_config, make_vision_iterator
from k25.data.vision import tasks as T
from k25.data.vision.dataset import _hash

TOK = load_tokenizer("byte")


def make_data(**kw) -> VisionTextData:
    cfg = default_vision_data_config()
    cfg.eval_per_task = 16
    for k, v in kw.items():
        cfg[k] = v
    return VisionTextData(cfg, TOK)


def test_samples_are_deterministic():
    a, b = make_data(), make_data()
    for batch, row in [(0, 0), (3, 5), (17, 2)]:
        sa, sb = a.train_sample(0, batch, row), b.train_sample(0, batch, row)
        np.testing.assert_array_equal(sa.frames, sb.frames)
        assert (sa.task, sa.text) == (sb.task, sb.text)
    for task in a.eval_samples:
        assert [s.text for s in a.eval_samples[task]] == [s.text for s in b.eval_samples[task]]
    other = make_data(seed=1)
    assert any(not np.array_equal(a.train_sample(0, 0, r).frames, other.train_sample(0, 0, r).frames)
               for r in range(4))
    assert not np.array_equal(a.train_sample(0, 0, 0).frames, a.train_sample(1, 0, 0).frames)  # run seed


def test_held_out_samples_are_never_trained_on():
    data = make_data()
    held_out = {_hash(s.frames) for samples in data.eval_samples.values() for s in samples}
    assert len(held_out) == sum(len(v) for v in data.eval_samples.values())  # the eval renders are distinct
    train = {_hash(data.train_sample(0, b, r).frames) for b in range(40) for r in range(16)}
    assert not held_out & train
    train_digits, eval_digits = T.digit_indices("train", 0.2, 0), T.digit_indices("eval", 0.2, 0)
    assert not set(train_digits) & set(eval_digits) and len(train_digits) + len(eval_digits) == 1797


def test_a_collision_with_a_held_out_render_is_redrawn():
    data = make_data()
    first = data.train_sample(0, 5, 3)
    data.__dict__["_eval_hashes"] = frozenset({_hash(first.frames)})  # pretend that render were held out
    again = data.train_sample(0, 5, 3)
    assert not np.array_equal(again.frames, first.frames)


def test_every_task_appears_with_its_weight_and_videos_on_schedule():
    data = make_data(video_every=3, tasks={"ocr": 1.0, "digits": 3.0})
    tasks = [data.train_sample(0, b, r).task for b in range(30) for r in range(8)]
    video_rows = [data.train_sample(0, b, 0).task for b in (2, 5, 8)]
    assert video_rows == ["motion"] * 3
    images = [t for t in tasks if t != "motion"]
    assert set(images) == {"ocr", "digits"} and 0.6 < images.count("digits") / len(images) < 0.9
    with pytest.raises(ValueError, match="unknown task"):
        make_data(tasks={"poetry": 1.0})


def test_motion_caption_names_the_direction_of_travel():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = T.motion(rng, 56)
        ink = [np.argwhere(np.abs(f.astype(int) - f[0, 0].astype(int)).sum(-1) > 60).mean(0) for f in s.frames]
        dy, dx = ink[-1] - ink[0]
        direction = s.answer.rsplit(" ", 1)[1]
        expected = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}
        assert expected[direction], (s.answer, dx, dy)
        assert s.frames.shape == (4, 56, 56, 3)


def test_grounding_box_holds_the_named_object_and_digits_keep_their_labels():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = T.grounding(rng, 56)
        colour = s.prompt.split()[3]
        x0, y0, x1, y1 = (int(v) for v in s.answer.strip("[]").split(","))
        patch = s.frames[0, y0:y1 + 1, x0:x1 + 1].astype(int)
        assert (np.abs(patch - np.array(T.COLOURS[colour])).sum(-1) < 10).mean() > 0.3, s.text
    images, labels = T._digits()
    pool = np.array([7])
    assert T.digits(rng, 56, pool).answer == f"digit {labels[7]}"


def test_encoding_goes_through_the_processor():
    data = make_data()
    s = data.eval_samples["ocr"][0]
    enc = data.encode(s)
    ref = preprocess_images([s.frames[0]])
    assert enc["pixel_values"].shape == (1, 4, 4, 3 * 14 * 14)
    np.testing.assert_array_equal(enc["pixel_values"].reshape(-1, 3, 14, 14), ref["pixel_values"])
    assert ref["image_grid_thw"].tolist() == [[1, 4, 4]]
    video = data.encode(data.eval_samples["motion"][0])["pixel_values"]
    assert video.shape == (4, 4, 4, 3 * 14 * 14)
    ids, mask, loss = enc["text_ids"], enc["text_mask"], enc["loss_mask"]
    n = int(mask.sum())
    assert TOK.decode(ids[1:n - 1].tolist()) == s.text and ids[0] == TOK.bos_id and ids[n - 1] == TOK.eos_id
    assert TOK.decode(ids[loss.astype(bool)][:-1].tolist()) == s.answer
    grounding = data.encode(data.eval_samples["grounding"][0])
    prompt_len = len(data.prompt_ids(data.eval_samples["grounding"][0]))
    assert grounding["loss_mask"][:prompt_len].sum() == 0 and grounding["loss_mask"][prompt_len] == 1


def test_iterator_resumes_and_processes_split_the_global_batch():
    data = make_data(video_every=2)
    it = make_vision_iterator(data, seed=0, batch_size=4)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert first["pixel_values"].shape == (4, 1, 4, 4, 588) and second["pixel_values"].shape == (4, 4, 4, 4, 588)
    resumed = make_vision_iterator(data, seed=0, batch_size=4)
    resumed.set_state(state)
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, second[k])
    halves = [next(make_vision_iterator(data, seed=0, batch_size=4, process_index=i, process_count=2))
              for i in range(2)]
    for k, v in first.items():
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)
