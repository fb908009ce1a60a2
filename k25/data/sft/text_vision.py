"""Text-vision SFT data: human-designed visual trajectories (the baseline the zero-vision set is compared with).

The model is shown the image (and it is bound as `image`); the trajectory looks closer with hand-written image
operations - crop a half or a quadrant, rotate, flip - each `display`ed so the tool returns the new image,
and then answers. The operations are picked per kind by rules a person would write (crop around where the
content is, flip a chart, zoom into a maze), run in the real sandbox, and the answer is the generator's ground
truth (the tool's images are evidence for the model, not a computed answer).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from k25.data.sft import vision_tasks
from k25.data.sft.trajectory import Plan

TRAIN_KINDS = tuple(vision_tasks.VISION_TASKS)
H = vision_tasks.SIZE // 2
OPS: tuple[tuple[str, str], ...] = (
    ("top half", f"display(image.crop((0, 0, {2 * H}, {H})))"),
    ("bottom half", f"display(image.crop((0, {H}, {2 * H}, {2 * H})))"),
    ("left half", f"display(image.crop((0, 0, {H}, {2 * H})))"),
    ("right half", f"display(image.crop(({H}, 0, {2 * H}, {2 * H})))"),
    ("rotate", "display(image.rotate(90))"),
    ("flip", "from PIL import ImageOps\ndisplay(ImageOps.mirror(image))"),
)


def plan(rng: np.random.Generator, kind: str | None = None) -> Plan:
    """A visual trajectory on one of the vision task kinds (train seeds; the eval uses another stream)."""
    kind = kind or str(rng.choice(TRAIN_KINDS))
    task = vision_tasks.VISION_TASKS[kind](rng)
    if kind == "ocr":  # zoom into the halves where the word is
        picks = [0, 1]
    elif kind in ("chart", "maze"):
        picks = [int(rng.choice([0, 1])), int(rng.choice([4, 5]))]
    else:
        picks = sorted(int(i) for i in rng.choice(len(OPS), int(rng.integers(1, 3)), replace=False))
    steps = [OPS[i][1] for i in picks]
    return Plan(f"text_vision/{kind}", task.user_content(), task.images, steps, task.answer, verify=False)


KINDS: dict[str, Callable[[np.random.Generator], Plan]] = {"text_vision": plan}
