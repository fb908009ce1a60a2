"""Vision tasks with the image given and the Python tool available: the zero-vision evaluation set.

Kinds: the rendered tasks of `k25.data.vision.tasks` asked as questions (counting, grounding, OCR, chart
reading) and the report's Figure 12 kinds (a maze solved by binarisation + BFS, a pie chart read through
colour masks, spot-the-difference through a difference map). Each `VisionTask` carries its images (bound in
the Python session under their names and shown in the user turn), the question, the ground truth, how to
score an answer, and a reference solution (`reference`: code that prints the answer when run on the images,
which tests run in the sandbox to show every kind is solvable with the tool). The human-designed
`text_vision` SFT trajectories (k25/data/sft/text_vision.py) reuse the same images and questions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import ImageDraw

from k25.data.sft.records import image_part
from k25.data.sft.trajectory import PRELUDE
from k25.data.sft.zero_vision import BFS, LOAD, bfs_length, colour_mask, maze_grid
from k25.data.vision import tasks as vt
from k25.data.vision.draw import COLOURS, SHAPES, canvas, draw_shape, to_array
from k25.rl.rewards.answers import exact_match
from k25.rl.rewards.geometry import grounding_f1
from k25.rl.rewards.parse import final_answer, parse_boxes, parse_number

SIZE = 56  # pixels per side: 4 x 4 patches of 14, 4 merged vision tokens per image
MAZE_CELL = 8  # pixels per maze cell (7 x 7 cells = 56 pixels)


@dataclasses.dataclass
class VisionTask:
    kind: str
    images: dict[str, np.ndarray]  # name -> (H, W, 3) uint8, bound in the session and shown in this order
    question: str
    answer: str
    score: str  # "number" | "box" | "text" | "numbers"
    reference: str  # code that prints `answer`

    def user_content(self) -> list[dict[str, Any]]:
        names = " and ".join(f"`{n}`" for n in self.images)
        bound = f"The image is bound as {names}." if len(self.images) == 1 else f"The images are bound as {names}."
        return [image_part(im) for im in self.images.values()] + [{"type": "text", "text": f"{bound} "
                                                                                          f"{self.question}"}]

    def grade(self, content: str | None) -> float:
        """1.0 if the final answer in `content` is right (a box: IoU >= 0.5), else 0.0."""
        pred = final_answer(content or "")
        if self.score == "number":
            value = parse_number(pred)
            return float(value is not None and abs(value - float(self.answer)) < 1e-6)
        if self.score == "box":
            boxes = parse_boxes(pred)
            return float(len(boxes) == 1 and grounding_f1(boxes, parse_boxes(self.answer)) >= 1.0 - 1e-9)
        if self.score == "numbers":
            return float(re.findall(r"-?\d+", pred) == re.findall(r"-?\d+", self.answer))
        return exact_match(pred.strip().strip('"'), self.answer, ignore_case=True)


def counting(rng: np.random.Generator) -> VisionTask:
    s = vt.counting(rng, SIZE)
    colour = s.prompt.split()[2]
    code = PRELUDE + LOAD + colour_mask(colour) + "print(ndimage.label(m)[1])"
    return VisionTask("counting", {"image": s.frames[0]}, f"How many {colour} shapes are there?", s.answer, "number",
                      code)


def grounding(rng: np.random.Generator) -> VisionTask:
    s = vt.grounding(rng, SIZE)
    _, _, _, colour, shape = s.prompt.rstrip("?").split()
    code = (PRELUDE + LOAD + colour_mask(colour) + "l,n=ndimage.label(m)\n"
            "o=max(ndimage.find_objects(l),key=lambda t:(t[0].stop-t[0].start)*(t[1].stop-t[1].start))\n"
            "print([o[1].start,o[0].start,o[1].stop-1,o[0].stop-1])")
    return VisionTask("grounding", {"image": s.frames[0]}, f"Where is the {colour} {shape}? Give its box [x0, y0, x1, "
                      "y1] in pixels.", s.answer, "box", code)


def ocr(rng: np.random.Generator) -> VisionTask:
    s = vt.ocr(rng, SIZE)
    word = s.answer.split('"')[1]
    # no OCR library in the sandbox: the reference states what a reader sees (the tool cannot read for it)
    return VisionTask("ocr", {"image": s.frames[0]}, "What word is written in the image?", word, "text",
                      f"print({word!r})")


def chart(rng: np.random.Generator) -> VisionTask:
    s = vt.chart(rng, SIZE)
    heights = s.answer.split()[1:]
    unit, base = (SIZE - 8) // 4, SIZE - 4  # as k25.data.vision.tasks.chart draws them; the axis starts at `base`
    img = s.frames[0]
    pixel = img[base - 1, 4 + 2 + SIZE // 10].astype(int)  # inside the first bar
    colour = min(COLOURS, key=lambda c: int(np.abs(pixel - COLOURS[c]).sum()))
    code = (PRELUDE + LOAD + colour_mask(colour) + f"l,n=ndimage.label(m[:{base}])\n"
            "s=sorted(ndimage.find_objects(l),key=lambda t:t[1].start)\n"
            f"print(' '.join(str(round((t[0].stop-t[0].start)/{unit})) for t in s))")
    return VisionTask("chart", {"image": img}, f"Read the bar heights from left to right (1 unit = {unit} pixels).",
                      " ".join(heights), "numbers", code)


def maze(rng: np.random.Generator) -> VisionTask:
    grid = maze_grid(rng, 3)
    floor = [tuple(int(v) for v in p) for p in np.argwhere(grid == ".")]
    i, j = rng.choice(len(floor), 2, replace=False)
    start, end = floor[int(i)], floor[int(j)]
    colours = {"#": (20, 20, 20), ".": (245, 245, 245)}
    rgb = np.asarray([[colours[c] for c in row] for row in grid], np.uint8)
    rgb[start], rgb[end] = COLOURS["green"], COLOURS["red"]
    img = np.kron(rgb, np.ones((MAZE_CELL, MAZE_CELL, 1), np.uint8))
    c = MAZE_CELL
    code = (PRELUDE + f"a=np.array(image.convert('RGB')).astype(int)[{c // 2}::{c},{c // 2}::{c}]\n" +
            colour_mask("green", "g") + colour_mask("red", "r") + "free=a.sum(-1)>100\n" + BFS)
    return VisionTask("maze", {"image": img}, f"Walls are black; walk from the green cell to the red one (cells are "
                      f"{c} pixels). How many steps is the shortest path?", str(bfs_length(grid != "#", start, end)),
                      "number", code)


def pie(rng: np.random.Generator) -> VisionTask:
    k = int(rng.integers(1, 10))
    asked, other = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
    img = canvas(SIZE, rng)
    draw = ImageDraw.Draw(img)
    start = float(rng.uniform(0, 360))
    box = (4, 4, SIZE - 5, SIZE - 5)
    draw.pieslice(box, start, start + 36 * k, fill=COLOURS[asked])
    draw.pieslice(box, start + 36 * k, start + 360, fill=COLOURS[other])
    code = (PRELUDE + LOAD + "ink=a.sum(-1)<600\n" + colour_mask(asked) + "print(int(round(10*m.sum()/ink.sum()))*10)")
    return VisionTask("pie", {"image": to_array(img)}, f"What percent of the pie is {asked}? Round to the nearest 10.",
                      str(10 * k), "number", code)


def spot_difference(rng: np.random.Generator) -> VisionTask:
    n = int(rng.integers(2, 5))
    cells = vt._cells(rng, n)
    objects = [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))) for _ in range(n)]
    base = canvas(SIZE, rng)
    other = base.copy()
    changed = set(int(v) for v in rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
    for idx, ((r, c), (shape, colour)) in enumerate(zip(cells, objects)):
        box = vt._cell_box(r, c, SIZE, 2)
        draw_shape(base, shape, box, colour)
        if idx in changed:
            if rng.random() < 0.5:
                continue  # removed in the second image
            colour = str(rng.choice([x for x in COLOURS if x != colour]))
        draw_shape(other, shape, box, colour)
    code = (PRELUDE + "d=(np.array(image.convert('RGB')).astype(int)-np.array(image2.convert('RGB'))).any(-1)\n"
            "print(ndimage.label(d)[1])")
    return VisionTask("spot_difference", {"image": to_array(base), "image2": to_array(other)},
                      "How many differences are there between the two images?", str(len(changed)), "number", code)


VISION_TASKS: dict[str, Callable[[np.random.Generator], VisionTask]] = {
    "counting": counting, "grounding": grounding, "ocr": ocr, "chart": chart, "maze": maze, "pie": pie,
    "spot_difference": spot_difference}


def eval_tasks(kinds: list[str], per_kind: int, seed: int) -> list[VisionTask]:
    """`per_kind` held-out tasks of each kind (a seed stream the SFT sources never use)."""
    unknown = sorted(set(kinds) - set(VISION_TASKS))
    if unknown:
        raise ValueError(f"unknown vision eval kind(s) {unknown}; choose from {sorted(VISION_TASKS)}")
    return [VISION_TASKS[k](np.random.default_rng(eval_key(seed, i, j))) for j, k in enumerate(kinds)
            for i in range(per_kind)]


def eval_key(seed: int, i: int, j: int) -> list[int]:
    """The seed key of the i-th held-out task of the j-th kind (the RL stage rebuilds tasks from it)."""
    return [int(seed), 7919, int(i), int(j)]

