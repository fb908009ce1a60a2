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

`plan_vision` then lays each device's chunks out as one packed sequence of a fixed per-device budget
(patches P, LLM tokens T), and every index a packed MoonViT pass needs becomes *data* (arrays of leading
dimension n_devices), not static grid metadata. Two consequences: one SPMD program (`jax.shard_map`)
encodes different grids on different devices, and a step compiled for a budget never recompiles when the
images change. The learned position table's bicubic resampling becomes per-patch taps (4 row and 4 column
source indices with weights) for the same reason.
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


def _need(value: int, budget: int | None, name: str) -> int:
    if budget is None:
        return max(value, 1)
    if value > budget:
        raise ValueError(f"{name}={budget} is too small: a device needs {value}; raise {name}.")
    return budget


def plan_vision(batch: dict[str, Any], cfg: K25Config, assignment: Sequence[Sequence[int]], *,
                patch_budget: int | None = None, token_budget: int | None = None) -> VisionPlan:
    """Lay out each device's chunks as one packed, padded sequence; see the module docstring.

    `batch` holds host arrays: input_ids (B, S), pixel_values / image_grid_thw and/or pixel_values_videos /
    video_grid_thw in the HF processor layout. Budgets (per device) fix the shapes so the step compiles
    once; None uses the largest device's need.
    """
    vc = cfg.vision_config
    kh, kw = vc.merge_kernel_size
    chunks = media_chunks(batch, cfg)
    flat = [c for dev in assignment for c in dev]
    if sorted(flat) != list(range(len(chunks))):
        raise ValueError(f"assignment must list every chunk index 0..{len(chunks) - 1} exactly once, got {flat}.")
    input_ids = np.asarray(batch["input_ids"])
    layouts = [packed_layout(tuple(chunks[i].grid for i in dev), kh, kw, vc.pos_emb_time) if dev else None
               for dev in assignment]
    loads = [lay.num_patches if lay else 0 for lay in layouts]
    n_tok = [sum(lay.tokens_per_chunk) if lay else 0 for lay in layouts]
    p = _need(max(loads, default=0), patch_budget, "patch_budget")
    t = _need(max(n_tok, default=0), token_budget, "token_budget")
    arrays = _device_arrays(batch, cfg, chunks, assignment, layouts, p, t)
    arrays["media_src"] = _media_src(input_ids, cfg, chunks, assignment, layouts, t)
    return VisionPlan(assignment=tuple(tuple(d) for d in assignment), patches_per_device=tuple(loads),
                      arrays=arrays)


def _device_arrays(batch, cfg: K25Config, chunks, assignment, layouts, p: int, t: int) -> dict[str, np.ndarray]:
    vc = cfg.vision_config
    n, f, k = len(assignment), vc.pos_emb_time, vc.merge_area
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
    for d, (dev, lay) in enumerate(zip(assignment, layouts)):
        if lay is None:
            continue
        m = lay.num_patches
        out["vision/segment_ids"][d, :m] = lay.segment_ids
        out["vision/positions"][d, :m] = lay.positions
        out["vision/frame_index"][d, :m] = lay.frame_index
        merge = np.where(lay.merge_index == m, p, lay.merge_index)
        out["vision/merge_index"][d, :merge.shape[0], :merge.shape[1]] = merge
        out["vision/merge_count"][d, :merge.shape[0]] = lay.merge_count
        start = 0
        for i in dev:
            c = chunks[i]
            tt, h, w = c.grid
            px = np.asarray(pixels[c.kind][c.pixel_start:c.pixel_start + c.patches], np.float32)
            out["vision/patches"][d, start:start + c.patches] = px.reshape(c.patches, -1)
            ri, rw = _bicubic_taps(h, vc.pos_emb_height)
            ci, cw = _bicubic_taps(w, vc.pos_emb_width)
            rows, cols = lay.positions[start:start + c.patches].T
            out["vision/row_taps"][d, start:start + c.patches] = ri[rows]
            out["vision/row_weights"][d, start:start + c.patches] = rw[rows]
            out["vision/col_taps"][d, start:start + c.patches] = ci[cols]
            out["vision/col_weights"][d, start:start + c.patches] = cw[cols]
            start += c.patches
    return out


def _media_src(input_ids: np.ndarray, cfg: K25Config, chunks, assignment, layouts, t: int) -> np.ndarray:
    """(B, S) row of the flat (n_devices * T) encoder output each placeholder takes; -1 at text tokens."""
    src = {"image": [], "video": []}
    where = {}
    for d, (dev, lay) in enumerate(zip(assignment, layouts)):
        off = 0
        for i, n_tok in zip(dev, lay.tokens_per_chunk if lay else ()):
            where[i] = d * t + off
            off += n_tok
    for i, c in enumerate(chunks):
        src[c.kind].append(where[i] + np.arange(c.grid[1] * c.grid[2] // cfg.vision_config.merge_area))
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
