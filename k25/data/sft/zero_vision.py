"""Zero-vision SFT data: text-only tool-use trajectories in which Python stands in for looking at an image.

Each example gives a small picture *as text* (a character grid: `.` is the light background, letters are the
named colours of `k25.data.vision.draw.COLOURS`, `#` is black) and binds the same picture in the Python session
as the PIL image `image` (one pixel per character, the same RGB values the rendered vision tasks use). The
model never sees pixels; it learns to answer by writing code over `image` - binarise and count components,
take the bounding box of a colour mask, measure sizes, read bar heights, colour fractions, a BFS through a
maze, a difference map between two pictures - plus reading characters out of a matrix given as text. The
code is the same code that works on a real image (masks by RGB distance, `ndimage.label`), which is the
report's premise (§2.2): such text-only SFT activates visual tool use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from k25.data.sft.trajectory import PRELUDE, Plan
from k25.data.vision.draw import COLOURS

LETTERS = {"r": "red", "g": "green", "b": "blue", "y": "yellow", "p": "purple", "o": "orange"}
BACKGROUND = (245, 245, 245)
BLACK = (20, 20, 20)
LEGEND = ". background, # black, " + ", ".join(f"{k} {v}" for k, v in LETTERS.items())
LOAD = "a=np.array(image.convert('RGB')).astype(int)\n"
INK = "ink=a.sum(-1)<600\n"  # any colour or black (the light backgrounds sum to >= 675)


def colour_mask(colour: str, var: str = "m") -> str:
    """Code: `var` = pixels within 60 (L1) of the named colour."""
    return f"{var}=np.abs(a-{list(COLOURS[colour])}).sum(-1)<60\n"


def render(grid: np.ndarray) -> np.ndarray:
    """A character grid -> the (H, W, 3) uint8 image bound as `image`."""
    rgb = {".": BACKGROUND, "#": BLACK, **{k: COLOURS[v] for k, v in LETTERS.items()}}
    return np.asarray([[rgb[c] for c in row] for row in grid], np.uint8)


def text_of(grid: np.ndarray) -> str:
    return "\n".join("".join(row) for row in grid)


def place_blobs(rng: np.random.Generator, h: int, w: int, letters: list[str], max_side: int = 3,
                tries: int = 400) -> tuple[np.ndarray, list[tuple[str, int, int, int, int]]]:
    """Rectangles (one per letter) on a `.` grid, never touching each other (not even diagonally).
    Returns the grid and each blob's (letter, x0, y0, x1, y1)."""
    grid = np.full((h, w), ".", dtype="<U1")
    blobs = []
    for letter in letters:
        for _ in range(tries):
            bw, bh = int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            region = grid[max(0, y0 - 1):y0 + bh + 1, max(0, x0 - 1):x0 + bw + 1]
            if np.all(region == "."):
                grid[y0:y0 + bh, x0:x0 + bw] = letter
                blobs.append((letter, x0, y0, x0 + bw - 1, y0 + bh - 1))
                break
        else:
            raise RuntimeError("could not place the blobs; use a bigger grid")
    return grid, blobs


def _user(grid_text: str, question: str, names: str = "`image`") -> str:
    return f"{grid_text}\nThis picture is bound as {names} ({LEGEND}). {question}"


def count_all(rng: np.random.Generator) -> Plan:
    n = int(rng.integers(1, 6))
    grid, _ = place_blobs(rng, 8, 8, [str(rng.choice(list(LETTERS) + ["#"])) for _ in range(n)])
    code = PRELUDE + LOAD + INK + "print(ndimage.label(ink)[1])"
    return Plan("count_all", _user(text_of(grid), "How many shapes are there?"), {"image": render(grid)}, [code],
                str(n))


def count_colour(rng: np.random.Generator) -> Plan:
    asked, other = (str(c) for c in rng.choice(list(LETTERS), 2, replace=False))
    k, j = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    letters = [asked] * k + [other] * j
    rng.shuffle(letters)
    grid, _ = place_blobs(rng, 8, 8, letters, max_side=2)
    code = PRELUDE + LOAD + colour_mask(LETTERS[asked]) + "print(ndimage.label(m)[1])"
    return Plan("count_colour", _user(text_of(grid), f"How many {LETTERS[asked]} shapes are there?"),
                {"image": render(grid)}, [code], str(k))


def bbox(rng: np.random.Generator) -> Plan:
    letters = [str(c) for c in rng.choice(list(LETTERS), int(rng.integers(1, 4)), replace=False)]
    grid, blobs = place_blobs(rng, 8, 8, letters)
    letter, x0, y0, x1, y1 = blobs[int(rng.integers(len(blobs)))]
    code = (PRELUDE + LOAD + colour_mask(LETTERS[letter]) + "ys,xs=np.nonzero(m)\n"
            "print([int(xs.min()),int(ys.min()),int(xs.max()),int(ys.max())])")
    return Plan("bbox", _user(text_of(grid), f"Where is the {LETTERS[letter]} shape? Give its box [x0, y0, x1, y1] "
                              "in pixels."), {"image": render(grid)}, [code], str([x0, y0, x1, y1]))


def size(rng: np.random.Generator) -> Plan:
    letters = [str(c) for c in rng.choice(list(LETTERS), int(rng.integers(1, 4)), replace=False)]
    grid, blobs = place_blobs(rng, 8, 8, letters, max_side=4)
    letter, x0, y0, x1, y1 = blobs[int(rng.integers(len(blobs)))]
    code = (PRELUDE + LOAD + colour_mask(LETTERS[letter]) + "ys,xs=np.nonzero(m)\n"
            "print(int(xs.max()-xs.min()+1),int(ys.max()-ys.min()+1))")
    return Plan("size", _user(text_of(grid), f"How wide and how tall is the {LETTERS[letter]} shape, in pixels?"),
                {"image": render(grid)}, [code], f"{x1 - x0 + 1} {y1 - y0 + 1}")


def read_chars(rng: np.random.Generator) -> Plan:
    rows, cols = int(rng.integers(3, 5)), int(rng.integers(3, 6))
    mat = ["".join(chr(65 + int(v)) for v in rng.integers(0, 26, cols)) for _ in range(rows)]
    col = int(rng.integers(cols))
    code = f"m={mat!r}\nprint(''.join(r[{col}] for r in m))"
    text = "\n".join(mat)
    return Plan("read_chars", f"{text}\nRead the letters of column {col + 1} of this matrix, top to bottom.", {},
                [code], "".join(r[col] for r in mat))


def bars(rng: np.random.Generator) -> Plan:
    heights = [int(v) for v in rng.integers(1, 5, 3)]
    letter = str(rng.choice(list(LETTERS)))
    grid = np.full((6, 9), ".", dtype="<U1")
    for i, hgt in enumerate(heights):
        grid[5 - hgt:5, 1 + 3 * i:3 + 3 * i] = letter
    grid[5, :] = "b" if letter != "b" else "r"  # the axis, another colour
    code = (PRELUDE + LOAD + colour_mask(LETTERS[letter]) + "l,n=ndimage.label(m)\n"
            "s=sorted(ndimage.find_objects(l),key=lambda t:t[1].start)\n"
            "print(' '.join(str(t[0].stop-t[0].start) for t in s))")
    return Plan("bars", _user(text_of(grid), "Read the bar heights from left to right (1 pixel = 1 unit)."),
                {"image": render(grid)}, [code], " ".join(map(str, heights)))


def fraction(rng: np.random.Generator) -> Plan:
    asked, other = (str(c) for c in rng.choice(list(LETTERS), 2, replace=False))
    cells = 10
    k = int(rng.integers(1, cells))
    flat = np.array([asked] * k + [other] * (cells - k))
    rng.shuffle(flat)
    grid = np.full((4, 7), ".", dtype="<U1")
    grid[1, 1:6], grid[2, 1:6] = flat[:5], flat[5:]
    code = PRELUDE + LOAD + INK + colour_mask(LETTERS[asked]) + "print(int(round(10*m.sum()/ink.sum()))*10)"
    return Plan("fraction", _user(text_of(grid), f"What percent of the coloured area is {LETTERS[asked]}? Round to "
                                  "the nearest 10."), {"image": render(grid)}, [code], str(k * 10))


# BFS over `free` from the `g` mask's pixel to the `r` mask's (the border is all wall: no bounds checks).
BFS = ("from collections import deque\n"
       "S=tuple(np.argwhere(g)[0]);E=tuple(np.argwhere(r)[0]);d={S:0};q=deque([S])\n"
       "while q:\n"
       " p=q.popleft()\n"
       " for v in((p[0]+1,p[1]),(p[0]-1,p[1]),(p[0],p[1]+1),(p[0],p[1]-1)):\n"
       "  if v not in d and free[v]:d[v]=d[p]+1;q.append(v)\n"
       "print(d[E])")


def maze_grid(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A perfect maze (randomised DFS) of `cells` x `cells` rooms on a (2c+1)^2 grid of walls `#` and floor `.`."""
    n = 2 * cells + 1
    grid = np.full((n, n), "#", dtype="<U1")
    seen = {(0, 0)}
    stack = [(0, 0)]
    grid[1, 1] = "."
    while stack:
        y, x = stack[-1]
        nxt = [(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
               if 0 <= y + dy < cells and 0 <= x + dx < cells and (y + dy, x + dx) not in seen]
        if not nxt:
            stack.pop()
            continue
        ny, nx = nxt[int(rng.integers(len(nxt)))]
        grid[2 * ny + 1, 2 * nx + 1] = "."
        grid[y + ny + 1, x + nx + 1] = "."
        seen.add((ny, nx))
        stack.append((ny, nx))
    return grid


def bfs_length(free: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> int:
    """Shortest 4-connected path length on `free` (the ground truth, independent of the tool's code)."""
    dist = {start: 0}
    frontier = [start]
    while frontier:
        nxt = []
        for y, x in frontier:
            for v in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v[0] < free.shape[0] and 0 <= v[1] < free.shape[1] and free[v] and v not in dist:
                    dist[v] = dist[(y, x)] + 1
                    nxt.append(v)
        frontier = nxt
    return dist.get(end, -1)


def maze(rng: np.random.Generator) -> Plan:
    grid = maze_grid(rng, 3)
    floor = [tuple(int(v) for v in p) for p in np.argwhere(grid == ".")]
    i, j = rng.choice(len(floor), 2, replace=False)
    start, end = floor[int(i)], floor[int(j)]
    grid[start], grid[end] = "g", "r"
    code = (PRELUDE + LOAD + colour_mask("green", "g") + colour_mask("red", "r") + "free=a.sum(-1)>100\n" + BFS)
    answer = bfs_length(grid != "#", start, end)
    return Plan("maze", _user(text_of(grid), "Walls are black; walk from the green cell to the red one. How many "
                              "steps is the shortest path?"), {"image": render(grid)}, [code], str(answer))


def difference(rng: np.random.Generator) -> Plan:
    letters = [str(c) for c in rng.choice(list(LETTERS), int(rng.integers(2, 5)), replace=True)]
    grid, blobs = place_blobs(rng, 7, 7, letters, max_side=2)
    other = grid.copy()
    k = int(rng.integers(1, len(blobs) + 1))
    for idx in rng.choice(len(blobs), k, replace=False):
        letter, x0, y0, x1, y1 = blobs[int(idx)]
        other[y0:y1 + 1, x0:x1 + 1] = "." if rng.random() < 0.5 else \
            str(rng.choice([c for c in LETTERS if c != letter]))
    code = (PRELUDE + "d=(np.array(image.convert('RGB')).astype(int)-np.array(image2.convert('RGB'))).any(-1)\n"
            "print(ndimage.label(d)[1])")
    text = text_of(grid) + "\n\n" + text_of(other)
    return Plan("difference", _user(text, "How many differences are there between the two pictures?",
                                    "`image` (first) and `image2` (second)"),
                {"image": render(grid), "image2": render(other)}, [code], str(k))


KINDS: dict[str, Callable[[np.random.Generator], Plan]] = {
    "count_all": count_all, "count_colour": count_colour, "bbox": bbox, "size": size, "read_chars": read_chars,
    "bars": bars, "fraction": fraction, "maze": maze, "difference": difference}
