"""MoonViT-3D, the K2.5 vision tower, computed as transformers' `Kimi_K25VisionModel` does.

Images (t=1) and video chunks (t<=pos_emb_time frames) of any sizes are packed into one patch sequence
without padding. Attention is block-diagonal per chunk (segment ids): a chunk attends jointly over its
frames and never across chunks. Positions: a learned (H, W) table resampled bicubically to each chunk's
grid (torch `F.interpolate(mode="bicubic", align_corners=False)` semantics), plus a fixed sin-cos time row
per frame for multi-frame chunks only, plus axial 2D RoPE inside attention. After the final LayerNorm each
chunk is averaged over time and merged kh x kw -> one token (the projector concatenates the kh*kw patches).

`grid_thw` is host metadata (static under jit): every index below is computed in numpy from it.

Logical axes of the vision parameters: vit_patch (C*p*p patch pixels), vit_embed (vision width),
vit_heads (flattened heads x head_dim), vit_mlp, norm, and vit_layers for the block stack (not `layers`,
which the mesh maps to pipeline stages of the text decoder).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from k25.model.decoder import scan_layers
from k25.model.layers import param
from k25.model.vision_config import MoonViTConfig

NEG_INF = -1e30
Grid = tuple[tuple[int, int, int], ...]


# ----------------------------------------------------------------------------------------------- layers
def zeros_param(shape: Sequence[int], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


class DenseBias(nnx.Module):
    """y = x @ kernel + bias, kernel stored (in, out): the vision tower and projector use biases."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, dtype, param_dtype,
                 std: float, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_in, d_out), axes, param_dtype, std)
        self.bias = zeros_param((d_out,), (axes[1],), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dt = self.dtype
        return jnp.dot(x.astype(dt), self.kernel[...].astype(dt)) + self.bias[...].astype(dt)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance, affine), computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = param(rngs, (dim,), (axis_name,), param_dtype, None)
        self.bias = zeros_param((dim,), (axis_name,), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """transformers' ACT2FN entries used by vision towers."""
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"hidden_act={name!r} is not supported.")


# ------------------------------------------------------------------------------------ host-side layout
def normalize_grid(grid_thw: Any) -> Grid:
    """(t, h, w) rows as a hashable tuple of ints; accepts numpy, lists, torch tensors or concrete jax arrays."""
    if grid_thw is None:
        return ()
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError("grid_thw must be concrete host data (numpy / tuple), not a traced array: it fixes "
                        "shapes; pass it as a static argument under jit.")
    arr = np.asarray(grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw, dtype=np.int64)
    arr = arr.reshape(-1, 3)
    return tuple((int(t), int(h), int(w)) for t, h, w in arr)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Per-patch and per-token index arrays for a packed sequence of chunks (numpy, built once per grid)."""

    grids: Grid
    segment_ids: np.ndarray  # (N,) chunk index of each patch: block-diagonal attention
    positions: np.ndarray  # (N, 2) (row, col) of each patch inside its frame: axial RoPE
    frame_index: np.ndarray  # (N,) row of the time table: 0 (zeros) for t == 1, frame + 1 otherwise
    merge_index: np.ndarray  # (M, T_max, kh*kw) patches pooled into each token; N points at a zero row
    merge_count: np.ndarray  # (M,) frames averaged into each token (the chunk's t)
    tokens_per_chunk: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return int(self.segment_ids.shape[0])


@functools.lru_cache(maxsize=256)
def packed_layout(grids: Grid, kernel_h: int, kernel_w: int, max_frames: int) -> PackedLayout:
    """Index arrays for `grids`; validates each chunk against the merge kernel and the time table."""
    if not grids:
        raise ValueError("grid_thw is empty: pass at least one (t, h, w) row.")
    t_max = max(t for t, _, _ in grids)
    total = sum(t * h * w for t, h, w in grids)
    seg, pos, frame, merge, count, tokens = [], [], [], [], [], []
    offset = 0
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) <= 0:
            raise ValueError(f"grid_thw[{i}]={(t, h, w)} must be positive.")
        if h % kernel_h or w % kernel_w:
            raise ValueError(f"grid_thw[{i}]={(t, h, w)}: h and w must be multiples of merge_kernel_size="
                             f"{(kernel_h, kernel_w)}; pad images to multiples of merge*patch pixels.")
        if t > max_frames:
            raise ValueError(f"grid_thw[{i}] has t={t} frames but the time table holds pos_emb_time={max_frames}; "
                             f"cut videos into chunks of at most {max_frames} frames.")
        n = t * h * w
        seg.append(np.full(n, i, np.int32))
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pos.append(np.tile(np.stack([rows.ravel(), cols.ravel()], -1), (t, 1)))
        frame.append(np.repeat(np.arange(t) + int(t > 1), h * w))
        hm, wm = h // kernel_h, w // kernel_w
        idx = np.arange(offset, offset + n).reshape(t, hm, kernel_h, wm, kernel_w)
        idx = idx.transpose(1, 3, 0, 2, 4).reshape(hm * wm, t, kernel_h * kernel_w)
        merge.append(np.pad(idx, ((0, 0), (0, t_max - t), (0, 0)), constant_values=total))
        count.append(np.full(hm * wm, t, np.float32))
        tokens.append(hm * wm)
        offset += n
    return PackedLayout(grids=grids, segment_ids=np.concatenate(seg), positions=np.concatenate(pos).astype(np.int32),
                        frame_index=np.concatenate(frame).astype(np.int32),
                        merge_index=np.concatenate(merge).astype(np.int32), merge_count=np.concatenate(count),
                        tokens_per_chunk=tuple(tokens))


def tokens_per_chunk(grid_thw: Any, merge_kernel_size: Sequence[int] = (2, 2)) -> list[int]:
    """LLM tokens each (t, h, w) chunk becomes: one frame's worth, h*w/(kh*kw) (time is averaged away)."""
    kh, kw = merge_kernel_size
    return [h * w // (kh * kw) for _, h, w in normalize_grid(grid_thw)]


# ------------------------------------------------------------------------------------ position tables
@functools.partial(jax.jit, static_argnums=(0, 1))
def bicubic_matrix(out_size: int, in_size: int) -> jnp.ndarray:
    """(out, in) weights of torch's 1-D `F.interpolate(mode="bicubic", align_corners=False)`.

    Keys cubic convolution with A=-0.75; source x = (in/out) * (dst + 0.5) - 0.5 (half-pixel centres, no
    clamping of x); the 4 taps floor(x)-1 .. floor(x)+2 are clamped to the border, as torch reads them.
    """
    a = -0.75
    scale = jnp.float32(in_size) / jnp.float32(out_size)
    src = scale * (jnp.arange(out_size, dtype=jnp.float32) + 0.5) - 0.5
    base = jnp.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    coeffs = jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
    taps = jnp.clip(base.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, in_size - 1)
    rows = jnp.broadcast_to(jnp.arange(out_size)[:, None], taps.shape)
    return jnp.zeros((out_size, in_size), jnp.float32).at[rows, taps].add(coeffs)


def resample_pos_table(table: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Bicubically resample an (H, W, D) table to (height, width, D): the 4x4 tensor-product kernel, per axis."""
    src_h, src_w = table.shape[:2]
    out = table.astype(jnp.float32)
    if height != src_h:
        out = jnp.einsum("hH,HWd->hWd", bicubic_matrix(height, src_h), out)
    if width != src_w:
        out = jnp.einsum("wW,hWd->hwd", bicubic_matrix(width, src_w), out)
    return out


def sincos_time_table(num_frames: int, dim: int) -> np.ndarray:
    """(num_frames + 1, dim) float32: row 0 zeros (single-frame chunks), row f+1 = [sin(f w), cos(f w)]."""
    inv_freq = np.float32(1.0) / (np.float32(10000.0) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
    freqs = np.outer(np.arange(num_frames, dtype=np.float32), inv_freq).astype(np.float32)
    table = np.concatenate([np.sin(freqs), np.cos(freqs)], axis=1)
    return np.concatenate([np.zeros((1, dim), np.float32), table]).astype(np.float32)


def axial_rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin (N, head_dim) for rotate-half RoPE; angle pairs interleave (w, h) over head_dim/4 frequencies."""
    spatial = head_dim // 2
    inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (N, 2=(h, w), F)
    wh = jnp.swapaxes(freqs[:, ::-1, :], 1, 2).reshape(freqs.shape[0], -1)  # (N, 2F): w0, h0, w1, h1, ...
    angles = jnp.concatenate([wh, wh], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_half(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x (N, heads, d) rotated as transformers' rotate_half, in float32; cos/sin (N, d)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


# -------------------------------------------------------------------------------------------- modules
class PatchEmbed(nnx.Module):
    """14x14 patch conv (as a dense layer on flattened (C, p, p) pixels) plus spatial and temporal positions."""

    def __init__(self, cfg: MoonViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.proj = DenseBias(cfg.patch_dim, cfg.hidden_size, ("vit_patch", "vit_embed"), dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, std=cfg.initializer_range, rngs=rngs)
        shape = (cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden_size)
        table = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, cfg.weight_dtype)
        self.position_embeddings = nnx.Param(table, out_sharding=(None, None, "vit_embed"), eager_sharding=False)

    def positions(self, layout: PackedLayout) -> jnp.ndarray:
        """(N, D) float32: resampled spatial table per chunk (tiled over its frames) + time row per frame."""
        table = self.position_embeddings[...]
        cache: dict[tuple[int, int], jnp.ndarray] = {}
        parts = []
        for t, h, w in layout.grids:
            if (h, w) not in cache:
                cache[(h, w)] = resample_pos_table(table, h, w).reshape(h * w, -1)
            parts.append(jnp.tile(cache[(h, w)], (t, 1)) if t > 1 else cache[(h, w)])
        spatial = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        time = jnp.asarray(sincos_time_table(self.cfg.pos_emb_time, self.cfg.hidden_size))[layout.frame_index]
        return spatial + time

    def __call__(self, patches: jnp.ndarray, layout: PackedLayout) -> jnp.ndarray:
        h = self.proj(patches)
        return h + self.positions(layout).astype(h.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional attention inside each chunk: dense logits masked by segment ids (O(N^2) in the packed
    length; a segment-aware flash kernel is the drop-in for long packs)."""

    def __init__(self, cfg: MoonViTConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "std": cfg.initializer_range, "rngs": rngs}
        d = cfg.hidden_size
        self.q_proj = DenseBias(d, d, ("vit_embed", "vit_heads"), **kw)
        self.k_proj = DenseBias(d, d, ("vit_embed", "vit_heads"), **kw)
        self.v_proj = DenseBias(d, d, ("vit_embed", "vit_heads"), **kw)
        self.proj = DenseBias(d, d, ("vit_heads", "vit_embed"), **kw)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """x (N, D); cos/sin (N, head_dim); mask (N, N) bool, True where query and key share a chunk."""
        n = x.shape[0]
        q = apply_rope_half(self.q_proj(x).reshape(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope_half(self.k_proj(x).reshape(n, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(n, self.num_heads, self.head_dim)
        logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        probs = jax.nn.softmax(jnp.where(mask[None], logits, NEG_INF), axis=-1).astype(v.dtype)
        out = jnp.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        return self.proj(out)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: MoonViTConfig, *, rngs: nnx.Rngs):
        kw = {"dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "std": cfg.initializer_range, "rngs": rngs}
        self.fc1 = DenseBias(cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), **kw)
        self.fc2 = DenseBias(cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-LN block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, cfg: MoonViTConfig, *, rngs: nnx.Rngs):
        nkw = {"eps": cfg.layer_norm_eps, "dtype": cfg.compute_dtype, "param_dtype": cfg.weight_dtype, "rngs": rngs}
        self.norm1 = LayerNorm(cfg.hidden_size, **nkw)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, **nkw)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x)), None


@struct.dataclass
class VisionOutput:
    last_hidden_state: jnp.ndarray  # (N, D) after the final LayerNorm
    pooled: jnp.ndarray  # (M, kh*kw, D): time-averaged, kh x kw patches per LLM token (raster order)


def temporal_merge(hidden: jnp.ndarray, layout: PackedLayout) -> jnp.ndarray:
    """Average each chunk over its frames and group kh x kw patches: (N, D) -> (M, kh*kw, D)."""
    padded = jnp.concatenate([hidden.astype(jnp.float32), jnp.zeros((1, hidden.shape[-1]), jnp.float32)])
    summed = padded[jnp.asarray(layout.merge_index)].sum(axis=1)
    return (summed / jnp.asarray(layout.merge_count)[:, None, None]).astype(hidden.dtype)


def stacked_blocks(cfg: MoonViTConfig, rngs: nnx.Rngs) -> VisionBlock:
    """num_hidden_layers blocks with parameters stacked on a leading `vit_layers` axis, for lax.scan."""

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "vit_layers"})
    def create(r: nnx.Rngs) -> VisionBlock:
        return VisionBlock(cfg, rngs=r)

    return create(rngs)


class MoonViT(nnx.Module):
    """The vision tower: patch embed, scanned pre-LN blocks, final LayerNorm, temporal pool + spatial merge."""

    def __init__(self, cfg: MoonViTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.layers = stacked_blocks(cfg, rngs)
        self.final_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                                         param_dtype=cfg.weight_dtype, rngs=rngs)

    def layout(self, grid_thw: Any) -> PackedLayout:
        cfg = self.cfg
        return packed_layout(normalize_grid(grid_thw), *cfg.merge_kernel_size, cfg.pos_emb_time)

    def __call__(self, pixel_values: jnp.ndarray, grid_thw: Any) -> VisionOutput:
        """pixel_values (N, C, p, p) or (N, C*p*p) in the HF processor layout; grid_thw (chunks, 3) host ints."""
        cfg = self.cfg
        layout = self.layout(grid_thw)
        patches = jnp.asarray(pixel_values).reshape(pixel_values.shape[0], -1)
        if patches.shape != (layout.num_patches, cfg.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but grid_thw needs "
                             f"{layout.num_patches} patches of {cfg.patch_dim} values (C*p*p).")
        h = self.patch_embed(patches, layout)
        cos, sin = axial_rope_cos_sin(layout.positions, cfg.head_dim, cfg.rope_theta)
        seg = jnp.asarray(layout.segment_ids)
        mask = seg[:, None] == seg[None, :]
        h, _ = scan_layers(self.layers, h, cos, sin, mask)
        h = self.final_layernorm(h)
        return VisionOutput(last_hidden_state=h, pooled=temporal_merge(h, layout))
