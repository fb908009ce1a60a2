"""Host-side planning for the Decoupled Encoder Process (DEP, report §4.5.1): which device encodes which chunk.

Everything here is numpy on the host, run by the data side before a step. A *chunk* is one image or one
video chunk of <= pos_emb_time frames, i.e. one row of `image_grid_thw` / `video_grid_thw`; its load is
its patch count t*h*w.

Two assignments:

* `assign_chunks` (DEP): greedy longest-processing-time balancing over all devices of the mesh. Chunks
  are taken largest first and each goes to the currently least-loaded device, so the max load is within
  4/3 of optimal (Graham's bound) and in practice within one small chunk of the mean.
* `assign_by_rows` (no DEP, the conventional layout): a chunk is encoded by the device that owns the batch
  row holding its placeholder tokens; with pipeline stages only stage 0 holds the vision encoder, so the
  other stages get nothing. This is the imbalance DEP removes, kept as the baseline for `balance`.

`plan_vision` then lays each device's chunks out in packed bins (first-fit decreasing; attention is
computed per bin, so a long pack does not pay for a dense mask over all of it) within a fixed per-device
budget (patches P = n_bins * bin_size, LLM tokens T), and every index a packed MoonViT pass needs becomes
*data* (arrays of leading dimension n_devices), not static grid metadata. Two consequences: one SPMD
program (`jax.shard_map`) encodes different grids on different devices, and a step compiled for a budget
never recompiles when the images change. The learned position table's bicubic resampling becomes
per-patch taps (4 row and 4 column source indices with weights) for the same reason.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from k25.model.moonvit import Grid, bicubic_matrix, normalize_grid, packed_layout
from k25.model.vision_config import K25Config

TAPS = 4  # source rows (and columns) of one bicubic output sample
PAD_SEGMENT = -1  # segment id of padding patches: they attend only to each other and are never read


def assign_chunks(patch_counts: Sequence[int], n_devices: int) -> list[list[int]]:
    """Greedy (LPT) balance of chunks over devices by patch count: per device, the sorted chunk indices."""
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be >= 1.")
    counts = [int(c) for c in patch_counts]
    if any(c <= 0 for c in counts):
        raise ValueError(f"patch_counts={counts} must all be positive (t*h*w of each chunk).")
    heap = [(0, d) for d in range(n_devices)]  # (load, device): ties go to the lower device index
    out: list[list[int]] = [[] for _ in range(n_devices)]
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        load, d = heapq.heappop(heap)
        out[d].append(i)
        heapq.heappush(heap, (load + counts[i], d))
    return [sorted(c) for c in out]


def assign_by_rows(chunk_rows: Sequence[int], batch_size: int, mesh_shape: dict[str, int]) -> list[list[int]]:
    """Conventional data-parallel layout: each chunk goes to the stage-0 device that owns its batch row.

    Devices are numbered in mesh order (pp, dp, ep); batch rows are split in contiguous blocks over
    (dp, ep) (`k25.parallel.mesh`), and the vision encoder lives on pipeline stage 0 only.
    """
    pp, dp, ep = (int(mesh_shape.get(a, 1)) for a in ("pp", "dp", "ep"))
    blocks = dp * ep
    if batch_size % blocks:
        raise ValueError(f"batch_size={batch_size} must be divisible by dp*ep={blocks}.")
    per_block = batch_size // blocks
    out: list[list[int]] = [[] for _ in range(pp * blocks)]
    for i, row in enumerate(chunk_rows):
        if not 0 <= row < batch_size:
            raise ValueError(f"chunk_rows[{i}]={row} is outside the batch of {batch_size} rows.")
        out[row // per_block].append(i)  # stage 0 devices are the first dp*ep in mesh order
    return out


@dataclasses.dataclass(frozen=True)
class Chunk:
    kind: str  # "image" or "video"
    grid: tuple[int, int, int]
    pixel_start: int  # first row of its patches in that kind's pixel array
    token_start: int  # first of its LLM tokens among that kind's media tokens

    @property
    def patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


def media_chunks(batch: dict[str, Any], cfg: K25Config) -> list[Chunk]:
    """Images then video chunks (K25Model.embed's order) with where their pixels and tokens start.

    Checks that pixels and grids come in pairs and that input_ids has one placeholder per media token.
    """
    if "input_ids" not in batch:
        raise ValueError("batch['input_ids'] is missing: the placeholders say where media tokens go.")
    input_ids = np.asarray(batch["input_ids"])
    if input_ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be (batch, seq), got shape {input_ids.shape}.")
    kh, kw = cfg.vision_config.merge_kernel_size
    chunks: list[Chunk] = []
    for kind, px_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        grids: Grid = normalize_grid(batch.get(grid_key))
        px = batch.get(px_key)
        if (px is None) != (not grids):
            raise ValueError(f"batch[{px_key!r}] and batch[{grid_key!r}] must be given together.")
        pix = tok = 0
        for g in grids:
            chunks.append(Chunk(kind, g, pix, tok))
            pix += g[0] * g[1] * g[2]
            tok += g[1] * g[2] // (kh * kw)
        if px is not None and np.shape(px)[0] != pix:
            raise ValueError(f"batch[{px_key!r}] has {np.shape(px)[0]} patches but batch[{grid_key!r}] needs {pix}.")
        tok_id = cfg.image_token_id if kind == "image" else cfg.video_token_id
        found = int((input_ids == tok_id).sum())
        if found != tok:
            raise ValueError(f"batch['input_ids'] holds {found} {kind} placeholder(s) (id {tok_id}) but "
                             f"batch[{grid_key!r}] gives {tok} token(s); one placeholder per media token.")
    return chunks


def chunk_rows(input_ids: np.ndarray, chunks: Sequence[Chunk], cfg: K25Config) -> list[int]:
    """The batch row of each chunk's first placeholder token (placeholders are filled row-major)."""
    rows = []
    for kind, tok_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        where = np.nonzero(input_ids.reshape(-1) == tok_id)[0] // input_ids.shape[1]
        rows += [int(where[c.token_start]) for c in chunks if c.kind == kind]
    return rows


def _bicubic_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, TAPS) source indices and weights of moonvit's resampling along one axis (identity if equal)."""
    if out_size == in_size:
        idx = np.zeros((out_size, TAPS), np.int32)
        idx[:, 0] = np.arange(out_size)
        return idx, (np.arange(TAPS) == 0).astype(np.float32)[None].repeat(out_size, 0)
    mat = np.asarray(bicubic_matrix(out_size, in_size))
    idx, wts = np.zeros((out_size, TAPS), np.int32), np.zeros((out_size, TAPS), np.float32)
    for r in range(out_size):
        nz = np.nonzero(mat[r])[0]
        idx[r, :len(nz)], wts[r, :len(nz)] = nz, mat[r, nz]
    return idx, wts


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """Per-device packed vision inputs (`arrays`, leading dim n_devices) and where each LLM token comes from."""

    assignment: tuple[tuple[int, ...], ...]  # chunk indices per device
    patches_per_device: tuple[int, ...]  # real (unpadded) patches per device
    arrays: dict[str, np.ndarray]  # "vision/..." inputs of the sharded encoder, and "media_src"

    @property
    def balance(self) -> float:
        """max / mean patches per device: 1.0 is perfect; the step runs at the pace of the max."""
        loads = np.asarray(self.patches_per_device, np.float64)
        return float(loads.max() / loads.mean()) if loads.sum() else 1.0


def pack_bins(sizes: Sequence[int], bin_size: int) -> list[list[int]]:
    """First-fit decreasing of chunk sizes into bins of `bin_size` patches: the (sorted) indices per bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] > bin_size:
            raise ValueError(f"bin_size={bin_size} is smaller than a chunk of {sizes[i]} patches; raise bin_size.")
        b = next((b for b, r in enumerate(room) if r >= sizes[i]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(bin_size)
        bins[b].append(i)
        room[b] -= sizes[i]
    return [sorted(b) for b in bins]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one chunk sits: its device, first patch in the device's flat pack, first encoder output row."""

    device: int
    patch_start: int
    token_start: int


def _budget(need: int, budget: int | None, name: str) -> int:
    if budget is None:
        return max(need, 1)
    if need > budget:
        raise ValueError(f"{name}={budget} is too small: a device needs {need}; raise {name}.")
    return budget


def plan_vision(batch: dict[str, Any], cfg: K25Config, assignment: Sequence[Sequence[int]], *,
                bin_size: int | None = None, patch_budget: int | None = None,
                token_budget: int | None = None) -> VisionPlan:
    """Lay out each device's chunks as packed, padded bins; see the module docstring.

    `batch` holds host arrays: input_ids (B, S), pixel_values / image_grid_thw and/or pixel_values_videos /
    video_grid_thw in the HF processor layout. A device's chunks go into bins of `bin_size` patches (first-fit
    decreasing); attention runs per bin, so its cost is n_bins * bin_size^2 rather than the square of the
    device's whole pack (None: one bin per device). Budgets (per device: patches, a multiple of bin_size,
    and encoder output tokens) fix the shapes so the step compiles once; None uses the largest need.
    """
    chunks = media_chunks(batch, cfg)
    flat = [c for dev in assignment for c in dev]
    if sorted(flat) != list(range(len(chunks))):
        raise ValueError(f"assignment must list every chunk index 0..{len(chunks) - 1} exactly once, got {flat}.")
    merge = cfg.vision_config.merge_area
    loads = [sum(chunks[i].patches for i in dev) for dev in assignment]
    tokens = [sum(chunks[i].grid[1] * chunks[i].grid[2] // merge for i in dev) for dev in assignment]
    size = bin_size or _budget(max(loads, default=0), patch_budget, "patch_budget")
    if patch_budget is not None and patch_budget % size:
        raise ValueError(f"patch_budget={patch_budget} must be a multiple of bin_size={size}.")
    bins = [[[dev[j] for j in b] for b in pack_bins([chunks[i].patches for i in dev], size)] for dev in assignment]
    n_bins = max(max((len(b) for b in bins), default=0), 1)
    n_bins = _budget(n_bins * size, patch_budget, "patch_budget") // size
    t = _budget(max(tokens, default=0), token_budget, "token_budget")
    slots: dict[int, Slot] = {}
    for d, dev_bins in enumerate(bins):
        tok = 0
        for b, members in enumerate(dev_bins):
            off = b * size
            for i in members:
                slots[i] = Slot(d, off, tok)
                off += chunks[i].patches
                tok += chunks[i].grid[1] * chunks[i].grid[2] // merge
    arrays = _device_arrays(batch, cfg, chunks, slots, len(assignment), n_bins, size, t)
    arrays["media_src"] = _media_src(np.asarray(batch["input_ids"]), cfg, chunks, slots, t)
    return VisionPlan(assignment=tuple(tuple(d) for d in assignment), patches_per_device=tuple(loads),
                      arrays=arrays)


def _device_arrays(batch: dict[str, Any], cfg: K25Config, chunks: Sequence[Chunk], slots: dict[int, Slot],
                   n: int, n_bins: int, size: int, t: int) -> dict[str, np.ndarray]:
    """The `vision/*` arrays: per-patch ones (n, n_bins, bin_size, ...), per-output-token ones (n, T, ...)."""
    vc = cfg.vision_config
    kh, kw = vc.merge_kernel_size
    f, k, p = vc.pos_emb_time, vc.merge_area, n_bins * size
    pixels = {"image": batch.get("pixel_values"), "video": batch.get("pixel_values_videos")}
    out = {
        "vision/patches": np.zeros((n, p, vc.patch_dim), np.float32),
        "vision/segment_ids": np.full((n, p), PAD_SEGMENT, np.int32),
        "vision/positions": np.zeros((n, p, 2), np.int32),
        "vision/frame_index": np.zeros((n, p), np.int32),
        "vision/row_taps": np.zeros((n, p, TAPS), np.int32), "vision/row_weights": np.zeros((n, p, TAPS), np.float32),
        "vision/col_taps": np.zeros((n, p, TAPS), np.int32), "vision/col_weights": np.zeros((n, p, TAPS), np.float32),
        "vision/merge_index": np.full((n, t, f, k), p, np.int32),  # p: the zero row appended after the patches
        "vision/merge_count": np.ones((n, t), np.float32),
    }
    for i, slot in sorted(slots.items()):
        c, d, s = chunks[i], slots[i].device, slots[i].patch_start
        lay = packed_layout((c.grid,), kh, kw, f)
        m, n_tok = c.patches, lay.tokens_per_chunk[0]
        px = np.asarray(pixels[c.kind][c.pixel_start:c.pixel_start + m], np.float32)
        out["vision/patches"][d, s:s + m] = px.reshape(m, -1)
        out["vision/segment_ids"][d, s:s + m] = i
        out["vision/positions"][d, s:s + m] = lay.positions
        out["vision/frame_index"][d, s:s + m] = lay.frame_index
        rows, cols = lay.positions.T
        ri, rw = _bicubic_taps(c.grid[1], vc.pos_emb_height)
        ci, cw = _bicubic_taps(c.grid[2], vc.pos_emb_width)
        out["vision/row_taps"][d, s:s + m], out["vision/row_weights"][d, s:s + m] = ri[rows], rw[rows]
        out["vision/col_taps"][d, s:s + m], out["vision/col_weights"][d, s:s + m] = ci[cols], cw[cols]
        merged = np.where(lay.merge_index == m, p, lay.merge_index + s)
        out["vision/merge_index"][d, slot.token_start:slot.token_start + n_tok, :merged.shape[1]] = merged
        out["vision/merge_count"][d, slot.token_start:slot.token_start + n_tok] = lay.merge_count
    per_patch = ("patches", "segment_ids", "positions", "frame_index", "row_taps", "row_weights", "col_taps",
                 "col_weights")
    for key in per_patch:
        a = out[f"vision/{key}"]
        out[f"vision/{key}"] = a.reshape(n, n_bins, size, *a.shape[2:])
    return out


def _media_src(input_ids: np.ndarray, cfg: K25Config, chunks: Sequence[Chunk], slots: dict[int, Slot],
               t: int) -> np.ndarray:
    """(B, S) row of the flat (n_devices * T) encoder output each placeholder takes; -1 at text tokens."""
    src: dict[str, list[np.ndarray]] = {"image": [], "video": []}
    for i, c in enumerate(chunks):
        start = slots[i].device * t + slots[i].token_start
        src[c.kind].append(start + np.arange(c.grid[1] * c.grid[2] // cfg.vision_config.merge_area))
    out = np.full(input_ids.shape, -1, np.int32).reshape(-1)
    flat_ids = input_ids.reshape(-1)
    for kind, tok_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        if src[kind]:
            out[flat_ids == tok_id] = np.concatenate(src[kind])
    return out.reshape(input_ids.shape)


def balanced_plan(batch: dict[str, Any], cfg: K25Config, n_devices: int, **budgets: int | None) -> VisionPlan:
    """DEP's plan: chunks spread over all `n_devices` by patch count (`assign_chunks`)."""
    counts = [c.patches for c in media_chunks(batch, cfg)]
    return plan_vision(batch, cfg, assign_chunks(counts, n_devices), **budgets)


def rows_plan(batch: dict[str, Any], cfg: K25Config, mesh_shape: dict[str, int], *, global_rows: int | None = None,
              row_offset: int = 0, **budgets: int | None) -> VisionPlan:
    """The no-DEP plan: each chunk on the stage-0 device owning its batch row (`assign_by_rows`).

    For a microbatch, `global_rows` is the whole step's batch size and `row_offset` the global index of the
    microbatch's first row: row ownership is the step's, as the runtime shards the whole batch.
    """
    input_ids = np.asarray(batch["input_ids"])
    rows = [row_offset + r for r in chunk_rows(input_ids, media_chunks(batch, cfg), cfg)]
    n_rows = input_ids.shape[0] if global_rows is None else global_rows
    return plan_vision(batch, cfg, assign_by_rows(rows, n_rows, mesh_shape), **budgets)
