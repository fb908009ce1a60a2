"""Embedded vision-language data: seeded procedural image/video-text tasks plus scikit-learn's digits,
encoded through `k25.data.preprocess` into MoonViT inputs (see `dataset` for the held-out split)."""

from k25.data.vision.dataset import ALL_TASKS, VisionTextData, default_vision_data_config
from k25.data.vision.pipeline import make_vision_iterator
from k25.data.vision.tasks import IMAGE_TASKS, VIDEO_TASKS, Sample

__all__ = ["ALL_TASKS", "IMAGE_TASKS", "VIDEO_TASKS", "Sample", "VisionTextData", "default_vision_data_config",
           "make_vision_iterator"]
