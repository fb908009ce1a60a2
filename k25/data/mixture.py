"""Weighted, seeded mixing of record sources into one endless random-access stream.

``grain.MapDataset.mix`` interleaves sources in a fixed proportional pattern, so any window of the
stream holds each source in (almost exactly) its weight; a seeded window shuffle on top removes the
periodic order without disturbing those proportions. Finite (file) sources are globally shuffled and
repeated, in a new order every epoch; synthetic sources are already endless and randomly drawn.
`VisionSchedule` decides which rows of a joint run hold vision data (ratio and injection point).
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import grain
import numpy as np

_SMALL = 1 << 20  # up to this size an epoch's permutation is materialized (8 MB); grain's shuffle beyond


class EpochShuffle(grain.MapDataset):
    """Endless epochs of a finite dataset, each in its own seeded permutation.

    The same as ``ds.shuffle(seed).repeat()``, but with numpy permutations: grain's index shuffle costs
    milliseconds per element on datasets of a few hundred records.
    """

    def __init__(self, parent: grain.MapDataset, seed: int) -> None:
        super().__init__(parent)
        self._seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._cache  # one (epoch, permutation) pair; reads run ahead by at most a buffer
        if cached is None or cached[0] != epoch:
            cached = self._cache = (epoch, np.random.default_rng([self._seed, epoch]).permutation(len(self._parent)))
        return cached[1]

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - grain's signature: int or slice
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self._parent))
        return self._parent[int(self._permutation(epoch)[i])]


def parse_weights(sources: Any) -> dict[str, float]:
    """Normalizes the ``sources`` config to ``{spec: weight}``.

    Accepts a mapping (or ConfigDict) of spec -> weight, a sequence of specs and/or ``(spec, weight)``
    pairs, or a string ``"spec=w,spec=w"`` (weight optional). File specs contain dots and slashes, which
    ConfigDict keys cannot, so they go in the sequence or string forms.
    """
    if isinstance(sources, str):
        items: list[Any] = [s.rpartition("=")[::2] if "=" in s else s for s in sources.split(",") if s.strip()]
    elif hasattr(sources, "items"):
        items = list(sources.items())
    elif isinstance(sources, Sequence):
        items = list(sources)
    else:
        raise TypeError(f"cannot read sources from {type(sources).__name__}")
    weights: dict[str, float] = {}
    for item in items:
        spec, weight = (item, 1.0) if isinstance(item, str) else item
        if float(weight) <= 0:
            raise ValueError(f"source {spec!r} has non-positive weight {weight}")
        weights[str(spec).strip()] = weights.get(str(spec).strip(), 0.0) + float(weight)
    if not weights:
        raise ValueError("no data sources configured")
    return weights


def mix(
    datasets: Mapping[str, grain.MapDataset],
    weights: Mapping[str, float],
    *,
    seed: int,
    shuffle_window: int = 1024,
) -> grain.MapDataset:
    """Mixes ``datasets`` by ``weights`` (same keys) into an endless ``MapDataset``, deterministic in ``seed``.

    ``shuffle_window`` below ~1024 is slow (grain's index shuffle again); 0 or 1 disables the window shuffle.
    """
    parts = []
    for name in datasets:
        ds = datasets[name]
        if len(ds) < sys.maxsize:  # finite: a fresh permutation per epoch with a per-source seed, forever
            source_seed = (seed + zlib.crc32(name.encode())) % 2**32
            ds = EpochShuffle(ds, source_seed) if len(ds) <= _SMALL else ds.shuffle(source_seed).repeat()
        parts.append(ds)
    mixed = grain.MapDataset.mix(parts, [float(weights[n]) for n in datasets]) if len(parts) > 1 else parts[0]
    if shuffle_window > 1:
        mixed = grain.experimental.WindowShuffleMapDataset(mixed, window_size=shuffle_window, seed=seed)
    return mixed


@dataclasses.dataclass(frozen=True)
class VisionSchedule:
    """Which rows of a run hold vision data: none in the first `inject_step` steps, then a `ratio` share.

    The report's early-fusion ablation (Table 1) holds the total text and vision budgets fixed across arms:
    a run of N row-slots spends the first `inject_at` x N on text alone and mixes vision into the rest at
    `ratio`, so its vision total is ratio x (1 - inject_at) x N. Rows after the injection point are numbered
    g = 0, 1, ... in step-major order and row g holds vision iff floor((g + 1) r) > floor(g r): exactly
    floor(G r) of the first G rows are vision rows, spread evenly, and any step's rows are a pure function
    of the step index (so a resumed run sees the same rows). `ratio` is kept as a Fraction so that arms
    whose products agree in exact arithmetic (0.1 x 1 = 0.2 x 0.5 = 0.5 x 0.2) get identical totals.
    """

    total_steps: int
    batch_size: int
    ratio: Fraction
    inject_step: int

    @classmethod
    def from_config(cls, ratio: float, inject_at: float, total_steps: int, batch_size: int) -> VisionSchedule:
        """Validates `config.data.vision_ratio` (0 < r <= 1) and `config.data.inject_at` (0 <= p < 1, p x
        total_steps a whole step)."""
        if not 0 < ratio <= 1:
            raise ValueError(f"config.data.vision_ratio={ratio} must be in (0, 1] (the share of rows holding "
                             "vision data after the injection point).")
        if not 0 <= inject_at < 1:
            raise ValueError(f"config.data.inject_at={inject_at} must be in [0, 1) (the fraction of the run "
                             "before vision data starts).")
        exact = Fraction(inject_at).limit_denominator(10**6) * total_steps
        if exact.denominator != 1:
            raise ValueError(f"config.data.inject_at={inject_at} x total_steps={total_steps} = {float(exact)} "
                             "is not a whole step; pick total_steps so the injection falls on a step boundary.")
        return cls(int(total_steps), int(batch_size), Fraction(ratio).limit_denominator(10**6), int(exact))

    def _vision_before(self, g: int) -> int:
        """Vision rows among the first g post-injection rows."""
        return (max(g, 0) * self.ratio.numerator) // self.ratio.denominator

    def vision_rows(self, step: int) -> np.ndarray:
        """(batch_size,) bool: which rows of step `step` (0-based batch index) hold vision data."""
        g0 = (step - self.inject_step) * self.batch_size
        if g0 < 0:
            return np.zeros(self.batch_size, bool)
        counts = np.asarray([self._vision_before(g0 + r) for r in range(self.batch_size + 1)])
        return np.diff(counts) > 0

    def rows_through(self, steps: int) -> tuple[int, int]:
        """(text rows, vision rows) in the first `steps` steps."""
        vision = self._vision_before((steps - self.inject_step) * self.batch_size)
        return steps * self.batch_size - vision, vision

    def totals(self) -> tuple[int, int]:
        """(text rows, vision rows) of the whole run."""
        return self.rows_through(self.total_steps)


def injection_for_budget(vision_share: float, ratio: float) -> float:
    """The injection point p that gives a run with vision ratio `ratio` a vision total of `vision_share` of all
    its tokens: ratio x (1 - p) = vision_share, i.e. the text-only prefix is as long as the fixed budgets
    require (the report's 0 % / 50 % / 80 % arms at 10:90 / 20:80 / 50:50 all spend 10 % on vision)."""
    p = 1 - Fraction(vision_share).limit_denominator(10**6) / Fraction(ratio).limit_denominator(10**6)
    if not 0 <= p < 1:
        raise ValueError(f"vision_share={vision_share} is not reachable at vision_ratio={ratio}: it needs "
                         f"vision_share <= vision_ratio.")
    return float(p)
