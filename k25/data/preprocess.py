"""Image / video preprocessing for MoonViT in numpy, reproducing transformers' Kimi-K2.5 processors.

Images keep their native resolution unless they exceed a patch budget (then they shrink, never grow),
are resized with antialiased bicubic, zero-padded bottom/right to multiples of merge*patch pixels (28),
normalised and cut into 14x14 patches. Videos are sampled at `fps`, cut into chunks of
`temporal_patch_size` frames (the last may be shorter) and each chunk is processed like an image stack.

Output layout is the processor's: pixel_values (N, 3, p, p) float32 with patches in raster order per
frame and frames in order; grid_thw (chunks, 3) int64 rows (t, h/p, w/p).

The resize is torch's uint8 antialiased bicubic (what torchvision runs on CPU for uint8 input, itself the
Pillow-SIMD algorithm): float Keys weights (a=-0.5) over the support, normalised, quantised to int16 at a
per-axis precision, horizontal pass then vertical pass, each rounded and clamped to uint8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGE_MEAN = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD
IMAGE_STD = (0.5, 0.5, 0.5)


def navit_resize(height: int, width: int, patch_size: int, merge_kernel_size: int, max_patches: int,
                 max_size_per_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (padded h, w)): shrink to fit max_patches and max_size_per_side patches per side."""
    num_patches_h = max(1.0, height // patch_size)
    num_patches_w = max(1.0, width // patch_size)
    scale_total = math.sqrt(max_patches / (num_patches_h * num_patches_w))
    scale_h = (max_size_per_side * patch_size) / height
    scale_w = (max_size_per_side * patch_size) / width
    scale = min(1.0, scale_total, scale_h, scale_w)
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    new_h = min(new_h, max_size_per_side * patch_size)
    new_w = min(new_w, max_size_per_side * patch_size)
    factor = merge_kernel_size * patch_size
    return (new_h, new_w), (new_h + (factor - new_h % factor) % factor, new_w + (factor - new_w % factor) % factor)


def _cubic_aa(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5), the antialias kernel of torch and torchvision."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output pixel: first source index, int16-quantised weights (out, K) and their precision bits."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    ksize = math.ceil(support) * 2 + 1
    centers = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    j = np.arange(ksize)
    valid = j[None, :] < (xmax - xmin)[:, None]
    w = np.where(valid, _cubic_aa((j[None, :] + xmin[:, None] - centers[:, None] + 0.5) * invscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)
    w_max = w.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    quantised = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return xmin, quantised, precision


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One integer pass along `axis` of a uint8 array, rounded and clamped to uint8."""
    in_size = img.shape[axis]
    xmin, weights, precision = _aa_weights(in_size, out_size)
    src = np.moveaxis(img, axis, 0)
    expand = (slice(None),) + (None,) * (src.ndim - 1)
    acc = np.full((out_size,) + src.shape[1:], (1 << precision) >> 1, np.int32)  # int32, as torch
    for k in range(weights.shape[1]):  # taps past a pixel's support have weight 0; clip keeps them in range
        acc += weights[:, k][expand] * src[np.minimum(xmin + k, in_size - 1)]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a uint8 (..., H, W, C) array, bit-exact with torch's uint8 kernel."""
    if image.dtype != np.uint8:
        raise ValueError(f"resize_bicubic takes uint8 pixels, got {image.dtype}; convert with "
                         "np.clip(x * 255, 0, 255).round().astype(np.uint8) first.")
    out = image
    if width != image.shape[-2]:
        out = _resample_axis(out, width, out.ndim - 2)
    if height != image.shape[-3]:
        out = _resample_axis(out, height, out.ndim - 3)
    return out


def to_rgb(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image or an (H, W) / (H, W, 1|3|4) array; alpha is composited over white."""
    if hasattr(image, "getbands"):  # PIL, converted as transformers does
        from PIL import Image

        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels, got {arr.dtype}.")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image shape {arr.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) channels-last.")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:  # as transformers: float composite, then to_dtype(uint8, scale=True)
        f = arr.astype(np.float32) * np.float32(1.0 / 255.0)
        rgb = f[..., :3] * f[..., 3:] + (np.float32(1.0) - f[..., 3:])
        return (rgb * np.float32(255.999)).astype(np.uint8)
    return arr


def _normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - 255 mean) / (255 std) in float32: the processor's fused rescale + normalize."""
    m = np.asarray(mean, np.float32) * np.float32(255.0)
    s = np.asarray(std, np.float32) * np.float32(255.0)
    return (pixels.astype(np.float32) - m) / s


def _patchify(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """(T, H, W, C) -> (T*gh*gw, C, p, p), patches raster-ordered inside each frame."""
    t, h, w, c = frames.shape
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(t, gh, patch_size, gw, patch_size, c).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(x.reshape(t * gh * gw, c, patch_size, patch_size))


def _process_stack(frames: np.ndarray, patch_size: int, merge_size: int, max_patches: int, max_size_per_side: int,
                   mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize, zero-pad, normalise and patchify (T, H, W, 3) uint8 frames that share one size."""
    t, height, width, _ = frames.shape
    (rh, rw), (ph, pw) = navit_resize(height, width, patch_size, merge_size, max_patches, max_size_per_side)
    frames = resize_bicubic(frames, rh, rw)
    frames = np.pad(frames, ((0, 0), (0, ph - rh), (0, pw - rw), (0, 0)))
    return _patchify(_normalize(frames, mean, std), patch_size), (t, ph // patch_size, pw // patch_size)


def preprocess_images(images: Sequence[Any], *, patch_size: int = 14, merge_size: int = 2, max_patches: int = 16384,
                      max_size_per_side: int = 512, image_mean: Sequence[float] = IMAGE_MEAN,
                      image_std: Sequence[float] = IMAGE_STD) -> dict[str, np.ndarray]:
    """{"pixel_values": (N, 3, p, p) float32, "image_grid_thw": (num_images, 3) int64} for uint8 images."""
    pixels, grids = [], []
    for image in images:
        px, grid = _process_stack(to_rgb(image)[None], patch_size, merge_size, max_patches, max_size_per_side,
                                  image_mean, image_std)
        pixels.append(px)
        grids.append(grid)
    return {"pixel_values": np.concatenate(pixels), "image_grid_thw": np.asarray(grids, np.int64).reshape(-1, 3)}


def sample_frame_indices(total_num_frames: int, video_fps: float | None, fps: float | None = 2.0,
                         num_frames: int | None = None) -> np.ndarray:
    """Uniformly spaced frame indices: `fps` frames per second of video (or exactly `num_frames`)."""
    if num_frames is None and fps is not None:
        if not video_fps:
            raise ValueError("sampling at fps needs the video's own frame rate; pass video_fps (or num_frames).")
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_num_frames)
    if num_frames > total_num_frames:
        raise ValueError(f"num_frames={num_frames} exceeds the video's {total_num_frames} frames; lower fps.")
    return np.arange(num_frames) * total_num_frames // num_frames


def preprocess_videos(videos: Sequence[Any], *, video_fps: Sequence[float | None] | None = None,
                      fps: float | None = 2.0, num_frames: int | None = None, do_sample_frames: bool = True,
                      temporal_patch_size: int = 4, patch_size: int = 14, merge_size: int = 2,
                      max_patches: int = 4096, max_size_per_side: int = 512,
                      image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD
                      ) -> dict[str, Any]:
    """Chunked videos: pixel_values_videos (N, 3, p, p), video_grid_thw (chunks, 3), num_chunks_per_video,
    chunk_timestamps (seconds of each chunk's first frame, per video; None without video_fps).

    Each video is (T, H, W, C) uint8 frames or a list of frames; with do_sample_frames it is first sampled
    at `fps` (needs video_fps) or to `num_frames`.
    """
    video_fps = list(video_fps) if video_fps is not None else [None] * len(videos)
    if len(video_fps) != len(videos):
        raise ValueError(f"video_fps has {len(video_fps)} entries for {len(videos)} videos.")
    pixels, grids, chunks_per_video, timestamps = [], [], [], []
    for video, vfps in zip(videos, video_fps):
        frames = np.stack([to_rgb(f) for f in video])
        indices = np.arange(len(frames))
        if do_sample_frames:
            indices = sample_frame_indices(len(frames), vfps, fps=None if num_frames else fps, num_frames=num_frames)
            frames = frames[indices]
        starts = range(0, len(frames), temporal_patch_size)
        for s in starts:
            px, grid = _process_stack(frames[s:s + temporal_patch_size], patch_size, merge_size, max_patches,
                                      max_size_per_side, image_mean, image_std)
            pixels.append(px)
            grids.append(grid)
        chunks_per_video.append(len(starts))
        timestamps.append([float(indices[s]) / vfps for s in starts] if vfps else None)
    return {"pixel_values_videos": np.concatenate(pixels),
            "video_grid_thw": np.asarray(grids, np.int64).reshape(-1, 3),
            "num_chunks_per_video": chunks_per_video, "chunk_timestamps": timestamps}


def num_media_tokens(grid_thw: Any, merge_size: int = 2) -> list[int]:
    """Placeholder tokens per image or video chunk: h*w/merge^2 (a chunk's frames are averaged together)."""
    return [int(h) * int(w) // (merge_size * merge_size) for _, h, w in np.asarray(grid_thw).reshape(-1, 3)]
