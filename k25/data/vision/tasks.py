"""Procedural image-text and video-text tasks, each a pure function of a numpy Generator.

Every task returns a `Sample`: frames (T, H, W, 3) uint8 (T = 1 for images) and the text as a
`prompt` (may be empty; given to the captioner) plus the `answer` it must produce. The text is
always a function of what is visible, so exact-match captioning is attainable:

* shapes    - n same-coloured shapes: "3 red circles" (one shape also names its quadrant)
* grounding - "where is the blue square?" -> its box "[x0,y0,x1,y1]" in pixels (objects sit in a 4x4 cell grid)
* counting  - mixed colours: "how many green shapes?" -> "2"
* ocr       - a word in Pillow's bundled font: 'text "LAMP"'
* chart     - three bars of heights 1-4: "bars 3 1 4"
* digits    - scikit-learn's bundled 8x8 digits, upscaled: "digit 7" (split by image, see `digits`)
* motion    - a 4-frame video of one object moving: "the red circle moves left" (one frame cannot tell)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from k25.data.vision.draw import COLOURS, SHAPES, Box, canvas, draw_shape, draw_text, text_extent, to_array

GRID = 4  # objects are placed in a GRID x GRID layout of cells
QUADRANTS = (("top left", "top right"), ("bottom left", "bottom right"))
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
WORDS = ("CAT", "DOG", "SUN", "MAP", "CUP", "BOX", "KEY", "PEN", "HAT", "BUS", "ANT", "OWL", "FOX", "JAM",
         "LAMP", "FISH", "BOOK", "TREE", "DOOR", "MILK", "RAIN", "STAR", "BIRD", "CAKE", "FROG", "KITE",
         "MOON", "SHIP", "WOLF", "ZERO", "GOLD", "IRON")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MOTION_FRAMES = 4  # one MoonViT chunk


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full text the contrastive tower sees (prompt and answer)."""
        return f"{self.prompt} {self.answer}".strip()


def _cell_box(row: int, col: int, size: int, margin: int) -> Box:
    cell = size // GRID
    return col * cell + margin, row * cell + margin, (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    picks = rng.choice(GRID * GRID, size=n, replace=False)
    return [(int(p) // GRID, int(p) % GRID) for p in picks]


def _name(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def shapes(rng: np.random.Generator, size: int) -> Sample:
    n = int(rng.integers(1, 5))
    shape, colour = _name(rng, SHAPES), _name(rng, list(COLOURS))
    img = canvas(size, rng)
    cells = _cells(rng, n)
    for r, c in cells:
        draw_shape(img, shape, _cell_box(r, c, size, int(rng.integers(1, 4))), colour)
    if n == 1:
        r, c = cells[0]
        answer = f"one {colour} {shape}, {QUADRANTS[r * 2 // GRID][c * 2 // GRID]}"
    else:
        answer = f"{NUMBER_WORDS[n]} {colour} {shape}s"
    return Sample("shapes", to_array(img)[None], "", answer)


def grounding(rng: np.random.Generator, size: int) -> Sample:
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=3, replace=False)
    objects = [(SHAPES[int(k) // len(COLOURS)], list(COLOURS)[int(k) % len(COLOURS)]) for k in kinds]
    img = canvas(size, rng)
    boxes = [_cell_box(r, c, size, 2) for r, c in _cells(rng, len(objects))]
    for (shape, colour), box in zip(objects, boxes):
        draw_shape(img, shape, box, colour)
    target = int(rng.integers(len(objects)))
    shape, colour = objects[target]
    return Sample("grounding", to_array(img)[None], f"where is the {colour} {shape}?",
                  "[" + ",".join(str(v) for v in boxes[target]) + "]")


def counting(rng: np.random.Generator, size: int) -> Sample:
    asked, other = (list(COLOURS)[int(i)] for i in rng.choice(len(COLOURS), size=2, replace=False))
    n_asked, n_other = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    colours = [asked] * n_asked + [other] * n_other
    img = canvas(size, rng)
    for (r, c), colour in zip(_cells(rng, len(colours)), colours):
        draw_shape(img, _name(rng, SHAPES), _cell_box(r, c, size, int(rng.integers(1, 4))), colour)
    return Sample("counting", to_array(img)[None], f"how many {asked} shapes?", str(n_asked))


def ocr(rng: np.random.Generator, size: int) -> Sample:
    word = _name(rng, WORDS)
    font_size = int(rng.integers(13, 16))
    w, h = text_extent(word, font_size)
    img = canvas(size, rng)
    x, y = int(rng.integers(0, max(1, size - w))), int(rng.integers(0, max(1, size - h)))
    draw_text(img, word, (x, y), font_size, tuple(int(v) for v in rng.integers(0, 90, 3)))
    return Sample("ocr", to_array(img)[None], "", f'text "{word}"')


def chart(rng: np.random.Generator, size: int) -> Sample:
    heights = [int(v) for v in rng.integers(1, 5, size=3)]
    img = canvas(size, rng)
    colour = _name(rng, list(COLOURS))
    unit, base, width = (size - 8) // 4, size - 4, size // 5
    for i, h in enumerate(heights):
        x0 = 4 + i * (size - 8) // 3 + 2
        draw_shape(img, "square", (x0, base - h * unit, x0 + width, base), colour)
    draw_shape(img, "square", (2, base, size - 3, base + 1), "blue")  # the axis
    return Sample("chart", to_array(img)[None], "", "bars " + " ".join(map(str, heights)))


def motion(rng: np.random.Generator, size: int) -> Sample:
    direction = _name(rng, list(DIRECTIONS))
    shape, colour = _name(rng, SHAPES), _name(rng, list(COLOURS))
    dx, dy = DIRECTIONS[direction]
    obj = size // 4
    step = (size - obj) // (MOTION_FRAMES + 1)
    travel = step * (MOTION_FRAMES - 1)
    lo = np.array([0 if d >= 0 else travel for d in (dx, dy)])
    hi = np.array([size - obj - (travel if d > 0 else 0) for d in (dx, dy)])
    x, y = (int(v) for v in rng.integers(lo, hi + 1))
    background = canvas(size, rng)
    frames = []
    for f in range(MOTION_FRAMES):
        img = background.copy()
        fx, fy = x + dx * step * f, y + dy * step * f
        draw_shape(img, shape, (fx, fy, fx + obj - 1, fy + obj - 1), colour)
        frames.append(to_array(img))
    return Sample("motion", np.stack(frames), "", f"the {colour} {shape} moves {direction}")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digit_indices(split: str, eval_fraction: float, seed: int) -> np.ndarray:
    """The digits images of `split`: a fixed permutation of all 1797, the first `eval_fraction` held out."""
    images, _ = _digits()
    perm = np.random.default_rng(seed).permutation(len(images))
    n_eval = int(round(eval_fraction * len(images)))
    return perm[:n_eval] if split == "eval" else perm[n_eval:]


def digits(rng: np.random.Generator, size: int, pool: np.ndarray) -> Sample:
    """One of the images in `pool` (indices from `digit_indices`), dark ink on a tinted background."""
    images, labels = _digits()
    i = int(pool[int(rng.integers(len(pool)))])
    ink = images[i] / 16.0  # 0..1
    scale = size // 8
    big = np.kron(ink, np.ones((scale, scale), np.float32))
    pad = size - big.shape[0]
    big = np.pad(big, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    bg = rng.integers(200, 256, 3).astype(np.float32)
    fg = rng.integers(0, 80, 3).astype(np.float32)
    frame = (bg * (1 - big[..., None]) + fg * big[..., None]).round().astype(np.uint8)
    return Sample("digits", frame[None], "", f"digit {int(labels[i])}")


IMAGE_TASKS: dict[str, Callable[..., Sample]] = {
    "shapes": shapes, "grounding": grounding, "counting": counting, "ocr": ocr, "chart": chart, "digits": digits,
}
VIDEO_TASKS: dict[str, Callable[..., Sample]] = {"motion": motion}
