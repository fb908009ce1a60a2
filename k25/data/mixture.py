"""Weighted, seeded mixing of record sources into one endless random-access stream.

``grain.MapDataset.mix`` interleaves sources in a fixed proportional pattern, so any window of the
stream holds each source in (almost exactly) its weight; a seeded window shuffle on top removes the
periodic order without disturbing those proportions. Finite (file) sources are globally shuffled and
repeated, in a new order every epoch; synthetic sources are already endless and randomly drawn.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping, Sequence
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
