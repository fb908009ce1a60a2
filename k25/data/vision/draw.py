"""Pillow drawing helpers for the procedural vision tasks: named colours, three shapes, a bundled font.

Everything draws into RGB uint8 canvases. The font is Pillow's own `ImageFont.load_default(size=...)`
(a scalable TrueType face shipped inside the Pillow wheel), so rendered text needs no download and
renders identically wherever the same Pillow version is installed.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated, well separated colours: after 14x14 patching a patch's mean colour still names its object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 40, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) inclusive pixel bounds


def canvas(size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A light, slightly tinted background (so no two renders share an exact background by construction)."""
    h, w = (size, size) if isinstance(size, int) else size
    tone = tuple(int(v) for v in rng.integers(225, 256, 3))
    return Image.new("RGB", (w, h), tone)


def draw_shape(img: Image.Image, shape: str, box: Box, colour: str) -> None:
    """Fill `shape` inside `box` with the named colour."""
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}.")


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` pixels."""
    return ImageFont.load_default(size=size)


def draw_text(img: Image.Image, text: str, xy: tuple[int, int], size: int, colour: tuple[int, int, int]) -> None:
    ImageDraw.Draw(img).text(xy, text, font=font(size), fill=colour)


def text_extent(text: str, size: int) -> tuple[int, int]:
    """(width, height) in pixels of `text` at `size`, counted from the drawing origin."""
    _, _, x1, y1 = font(size).getbbox(text)
    return int(x1), int(y1)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).copy()
