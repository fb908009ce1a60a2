"""Seeded train / held-out streams of the vision tasks, encoded into MoonViT inputs and byte-token text.

Determinism: a sample is a pure function of (data seed, split, indices) through numpy's seeded
Generator, so the same config always yields the same pixels and text.

Held-out split: the eval set is a fixed list per task drawn from its own seed stream; digits are split
by image (scikit-learn's 1797 images, a fixed permutation). The train stream additionally redraws any
sample whose pixels equal a held-out sample's (a hash set of the eval frames), so no held-out image or
video is ever trained on. Captions of the simpler tasks do recur across splits (there are only so many
"two red circles"); what is held out are the renders.

Every image is `image_size` square (a multiple of 28, so the processor neither resizes nor pads) and every
video one chunk of 4 such frames, so all examples of a batch share one `grid_thw` row and batches have
static shapes under jit. Pixels go through `k25.data.preprocess` exactly as real images would.
"""

from __future__ import annotations

import functools
import hashlib

import ml_collections
import numpy as np

from k25.data.preprocess import preprocess_images, preprocess_videos
from k25.data.tokenizer import Tokenizer
from k25.data.vision.tasks import IMAGE_TASKS, VIDEO_TASKS, Sample, digit_indices

PATCH = 14
SPLITS = {"train": 0, "eval": 1}
ALL_TASKS = (*IMAGE_TASKS, *VIDEO_TASKS)


def default_vision_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        seed=0,  # fixes every sample and the held-out split, independently of the run's seed
        image_size=56,  # pixels per side, a multiple of 28: 4x4 patches -> 2x2 LLM tokens
        tasks={"shapes": 1.0, "grounding": 1.0, "counting": 1.0, "ocr": 1.0, "chart": 1.0, "digits": 1.0},
        video_every=4,  # every video_every-th batch holds motion videos (0: images only)
        text_len=48,  # byte tokens per text: bos + prompt + answer + eos, right-padded
        eval_per_task=48,  # held-out samples per task
        digits_eval_fraction=0.2,
        read_threads=2,  # batches assembled ahead by grain's read threads
    ))


def _hash(frames: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frames).tobytes(), digest_size=16).digest()


class VisionTextData:
    """The task mixture of one data config: held-out sets, the train sample stream and their encoding."""

    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.image_size % (2 * PATCH):
            raise ValueError(f"config.data.image_size={cfg.image_size} must be a multiple of {2 * PATCH} "
                             "(merged 2x2 patches of 14 pixels), so every example has the same grid.")
        unknown = sorted(set(cfg.tasks) - set(IMAGE_TASKS))
        if unknown or not cfg.tasks:
            raise ValueError(f"config.data.tasks has unknown task(s) {unknown}; choose from {sorted(IMAGE_TASKS)}.")
        names = sorted(cfg.tasks)
        weights = np.asarray([cfg.tasks[n] for n in names], np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"config.data.tasks weights must be >= 0 with a positive sum, got {dict(cfg.tasks)}.")
        self.image_tasks, self.image_probs = names, weights / weights.sum()
        self.video_tasks = sorted(VIDEO_TASKS) if cfg.video_every else []
        self.digit_pool = {s: digit_indices(s, cfg.digits_eval_fraction, cfg.seed) for s in SPLITS}

    # ------------------------------------------------------------------------------------------ samples
    def _make(self, task: str, rng: np.random.Generator, split: str) -> Sample:
        size = self.cfg.image_size
        if task == "digits":
            return IMAGE_TASKS[task](rng, size, self.digit_pool[split])
        return {**IMAGE_TASKS, **VIDEO_TASKS}[task](rng, size)

    @functools.cached_property
    def eval_samples(self) -> dict[str, list[Sample]]:
        """The fixed held-out samples, `eval_per_task` per task (motion included when videos are on)."""
        out = {}
        for t, task in enumerate(ALL_TASKS):
            if task in self.image_tasks or task in self.video_tasks:
                out[task] = [self._make(task, np.random.default_rng([self.cfg.seed, SPLITS["eval"], t, i]), "eval")
                             for i in range(self.cfg.eval_per_task)]
        return out

    @functools.cached_property
    def _eval_hashes(self) -> frozenset[bytes]:
        return frozenset(_hash(s.frames) for samples in self.eval_samples.values() for s in samples)

    def is_video_batch(self, batch_index: int) -> bool:
        every = self.cfg.video_every
        return bool(every) and batch_index % every == every - 1

    def train_sample(self, run_seed: int, batch_index: int, row: int) -> Sample:
        """Row `row` of global batch `batch_index`; redrawn until its pixels differ from every held-out one."""
        video = self.is_video_batch(batch_index)
        for attempt in range(100):
            rng = np.random.default_rng([self.cfg.seed, SPLITS["train"], run_seed, batch_index, row, attempt])
            if video:
                task = self.video_tasks[int(rng.integers(len(self.video_tasks)))]
            else:
                task = self.image_tasks[int(rng.choice(len(self.image_tasks), p=self.image_probs))]
            sample = self._make(task, rng, "train")
            if _hash(sample.frames) not in self._eval_hashes:
                return sample
        raise RuntimeError("100 draws in a row collided with held-out samples; the task has too few distinct renders.")

    # ----------------------------------------------------------------------------------------- encoding
    def encode_text(self, sample: Sample) -> dict[str, np.ndarray]:
        """text_ids = bos + prompt + answer + eos (right-padded); text_mask marks real tokens; loss_mask marks
        the tokens the captioner predicts (answer and eos), aligned with text_ids."""
        tok, n = self.tokenizer, self.cfg.text_len
        prompt = tok.encode(sample.prompt + " ") if sample.prompt else []
        answer = tok.encode(sample.answer) + [tok.eos_id]
        ids = [tok.bos_id, *prompt, *answer]
        if len(ids) > n:
            raise ValueError(f"{sample.task} text {sample.text!r} needs {len(ids)} tokens; raise config.data.text_len.")
        out = {"text_ids": np.full(n, tok.pad_id, np.int32), "text_mask": np.zeros(n, np.int32),
               "loss_mask": np.zeros(n, np.int32)}
        out["text_ids"][: len(ids)] = ids
        out["text_mask"][: len(ids)] = 1
        out["loss_mask"][len(ids) - len(answer): len(ids)] = 1
        return out

    def prompt_ids(self, sample: Sample) -> list[int]:
        """The prefix a captioner decodes from: bos + prompt."""
        return [self.tokenizer.bos_id, *(self.tokenizer.encode(sample.prompt + " ") if sample.prompt else [])]

    def encode_pixels(self, sample: Sample) -> np.ndarray:
        """(t, h, w, 3*14*14) float32 patches: the processor's pixel_values laid out on their grid_thw."""
        if sample.frames.shape[0] == 1:
            out = preprocess_images([sample.frames[0]])
            px, grid = out["pixel_values"], out["image_grid_thw"]
        else:
            out = preprocess_videos([sample.frames], do_sample_frames=False)
            px, grid = out["pixel_values_videos"], out["video_grid_thw"]
        if len(grid) != 1:
            raise ValueError(f"a {sample.task} sample became {len(grid)} chunks; videos must be one 4-frame chunk.")
        t, h, w = (int(v) for v in grid[0])
        return px.reshape(t, h, w, -1)

    def encode(self, sample: Sample) -> dict[str, np.ndarray]:
        return {"pixel_values": self.encode_pixels(sample), **self.encode_text(sample)}

    def collate(self, samples: list[Sample]) -> dict[str, np.ndarray]:
        rows = [self.encode(s) for s in samples]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
