"""k25.data.preprocess against transformers' Kimi-K2.5 image / video processors.

transformers' Kimi-K2.5 processors need torchvision, which this environment may lack. Where it is
missing, the reference is assembled from the processors' own pure functions (navit_resize and the two
patchify methods, executed from their source files) and torch's uint8 antialiased bicubic
`F.interpolate`, which is what torchvision's resize runs on CPU for uint8 bicubic input. With torchvision
(and Pillow) installed the processors themselves are compared too.
"""

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from k25.data.preprocess import (
    navit_resize,
    num_media_tokens,
    preprocess_images,
    preprocess_videos,
    resize_bicubic,
    sample_frame_indices,
    to_rgb,
)
from k25.model.moonvit import tokens_per_chunk

HF_DIR = Path(importlib.util.find_spec("transformers").origin).parent / "models" / "kimi_k25"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None and importlib.util.find_spec("PIL") is not None


def reference_function(filename: str, name: str, cls: str | None = None):
    """A function (or a method, called with self=None) compiled from the transformers source file."""
    tree = ast.parse((HF_DIR / filename).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body if cls else tree.body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), filename, "exec"), namespace)  # noqa: S102 (installed source)
    return namespace[name]


REF_NAVIT = reference_function("image_processing_kimi_k25.py", "navit_resize")
REF_NAVIT_VIDEO = reference_function("video_processing_kimi_k25.py", "navit_resize")
REF_PATCHIFY = reference_function("image_processing_kimi_k25.py", "patchify", "Kimi_K25ImageProcessor")
REF_PATCHIFY_VIDEO = reference_function("video_processing_kimi_k25.py", "patchify", "Kimi_K25VideoProcessor")


def torch_pipeline(frames: np.ndarray, max_patches: int, video: bool) -> tuple[np.ndarray, list[int]]:
    """The processors' _preprocess for one image or chunk (T, H, W, 3) uint8, with torch ops."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    (rh, rw), (ph, pw) = REF_NAVIT(x.shape[-2], x.shape[-1], 14, 2, max_patches, 512)
    if (rh, rw) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True)
    x = F.pad(x, (0, pw - rw, 0, ph - rh))
    mean = torch.tensor([0.5, 0.5, 0.5]) * (1 / (1 / 255))
    x = (x.to(torch.float32) - mean[:, None, None]) / mean[:, None, None]
    if video:
        patches, t, gh, gw = REF_PATCHIFY_VIDEO(None, x[None], 14)
        return patches[0].numpy(), [t, gh, gw]
    patches, gh, gw = REF_PATCHIFY(None, x, 14)
    return patches.reshape(-1, 3, 14, 14).numpy(), [1, gh, gw]


def test_navit_resize_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 4000, 2))
        args = (h, w, 14, 2, int(rng.choice([64, 1024, 4096, 16384])), int(rng.choice([16, 64, 512])))
        assert navit_resize(*args) == REF_NAVIT(*args) == REF_NAVIT_VIDEO(*args), args


@pytest.mark.parametrize("src,dst", [((97, 131), (50, 60)), ((40, 30), (200, 150)), ((64, 64), (64, 33)),
                                     ((301, 17), (77, 17)), ((9, 400), (3, 390)), ((5, 7), (2, 3))])
def test_resize_is_bit_exact_with_torch_uint8(src, dst):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, *src, 3), dtype=np.uint8)  # a frame stack resizes frame by frame
    ref = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size=dst, mode="bicubic",
                        antialias=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resize_bicubic(frames, *dst), ref)
    np.testing.assert_array_equal(resize_bicubic(frames[0], *dst), ref[0])


def test_images_match_processor_pipeline():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(50, 70, 3), (10, 10, 3), (300, 200, 3), (28, 56, 3)]]
    out = preprocess_images(images, max_patches=256)
    refs = [torch_pipeline(im[None], 256, video=False) for im in images]
    np.testing.assert_array_equal(out["pixel_values"], np.concatenate([r[0] for r in refs]))
    np.testing.assert_array_equal(out["image_grid_thw"], [r[1] for r in refs])
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape[1:] == (3, 14, 14)
    assert out["image_grid_thw"].tolist()[1] == [1, 2, 2]  # 10x10 is padded to 28x28, never upscaled
    # 300x200 (294 patches) shrinks to 280x186 for the 256-patch budget; padding to 28s then gives 20x14 = 280
    assert out["image_grid_thw"].tolist()[2] == [1, 20, 14]
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in out["image_grid_thw"])


def test_video_sampling_and_chunks_match_processor_pipeline():
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, (90, 40, 60, 3), dtype=np.uint8)  # 3 s at 30 fps -> 6 frames at 2 fps
    out = preprocess_videos([video, video[:45]], video_fps=[30.0, 30.0], fps=2.0)
    idx = sample_frame_indices(90, 30.0, 2.0)
    np.testing.assert_array_equal(idx, default_sample_indices_fn(VideoMetadata(total_num_frames=90, fps=30.0), fps=2))
    chunks = [video[idx][:4], video[idx][4:], video[:45][sample_frame_indices(45, 30.0, 2.0)]]
    refs = [torch_pipeline(c, 4096, video=True) for c in chunks]
    assert out["num_chunks_per_video"] == [2, 1]
    np.testing.assert_array_equal(out["video_grid_thw"], [[4, 4, 6], [2, 4, 6], [3, 4, 6]])
    np.testing.assert_array_equal(out["video_grid_thw"], [r[1] for r in refs])
    np.testing.assert_array_equal(out["pixel_values_videos"], np.concatenate([r[0] for r in refs]))
    assert out["chunk_timestamps"] == [[0.0, 2.0], [0.0]]


def test_frame_sampling_matches_transformers():
    for total, vfps, fps in [(90, 30.0, 2.0), (7, 24.0, 2.0), (1000, 29.97, 1.5), (5, 2.0, 2.0)]:
        ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=vfps), fps=fps)
        np.testing.assert_array_equal(sample_frame_indices(total, vfps, fps), ref)
    np.testing.assert_array_equal(sample_frame_indices(10, None, None, num_frames=4), [0, 2, 5, 7])
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(10, None, 2.0)


def test_token_counts_agree_with_the_model():
    grid = np.array([[1, 6, 8], [4, 4, 6], [2, 4, 6]])
    assert num_media_tokens(grid) == tokens_per_chunk(grid) == [12, 6, 6]


def test_to_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_rgb(gray), np.repeat(gray[..., None], 3, -1))
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(to_rgb(rgba), [[[200, 100, 0], [255, 255, 255]]])
    with pytest.raises(ValueError, match="uint8"):
        to_rgb(np.zeros((4, 4, 3), np.float32))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' Kimi-K2.5 processors need torchvision and Pillow")
def test_against_transformers_processors():
    from transformers.models.kimi_k25 import Kimi_K25ImageProcessor, Kimi_K25VideoProcessor

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(50, 70, 3), (300, 200, 3)]]
    ref = Kimi_K25ImageProcessor()(images, max_patches=256, return_tensors="np")
    out = preprocess_images(images, max_patches=256)
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])

    video = rng.integers(0, 256, (90, 40, 60, 3), dtype=np.uint8)
    ref = Kimi_K25VideoProcessor()(videos=[video], video_metadata=[{"total_num_frames": 90, "fps": 30.0}],
                                   return_tensors="np")
    out = preprocess_videos([video], video_fps=[30.0])
    np.testing.assert_array_equal(out["pixel_values_videos"], ref["pixel_values_videos"])
    np.testing.assert_array_equal(out["video_grid_thw"], ref["video_grid_thw"])
