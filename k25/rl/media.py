"""Images in RL trajectories: kept as references in the (JSON) rollout state, turned into pixels on demand.

A trajectory's images are the image parts of its messages, in order of appearance: the prompt's, then those
the tools returned. Each part's `image_url.url` is its reference, so episodes, carried partial rollouts and the
rollout buffer stay plain JSON and a resumed run sees exactly the same pixels:

  - `data:image/png;base64,...`: the image itself (lossless PNG); what a tool displayed, small crops;
  - `<scheme>:<rest>`: rebuilt by the resolver registered for `scheme`, e.g. the task's own images from the
    task generator and its seed (`k25.rl.vision`), so prompt images are never stored.

`MediaStore` resolves references (cached), preprocesses them as the sampler and the trainer both need them
(the HF processor layout of `k25.data.preprocess`) and counts their merged vision tokens, which the chat
format needs to render the placeholders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from k25.data.preprocess import preprocess_images
from k25.data.sft.records import decode_image

Resolver = Callable[[str], np.ndarray]  # the part of the reference after "<scheme>:" -> (H, W, 3) uint8


def image_url(part: Any) -> str | None:
    """The reference of an image part (`{"type": "image_url", "image_url": {"url": ...}}`), else None."""
    if not isinstance(part, Mapping) or part.get("type") not in ("image", "image_url"):
        return None
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, Mapping) else url or part.get("image")
    if not isinstance(url, str):
        raise ValueError(f"an image part needs image_url.url (a data URI or a registered reference): {part!r:.80}")
    return url


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The image references of `messages`, in the order the chat format renders them."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            out += [u for u in (image_url(p) for p in content) if u is not None]
    return out


def ref_part(url: str) -> dict[str, Any]:
    """An image part that holds a reference."""
    return {"type": "image_url", "image_url": {"url": url}}


class MediaStore:
    """References -> pixels (cached) for a vision encoder with `patch_size` / `merge_size`."""

    def __init__(self, resolvers: Mapping[str, Resolver], *, patch_size: int, merge_size: int, cache: int = 4096):
        self.resolvers = dict(resolvers)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.processed = functools.lru_cache(maxsize=cache)(self._processed)

    def image(self, url: str) -> np.ndarray:
        """The (H, W, 3) uint8 image a reference stands for."""
        if url.startswith("data:"):
            return decode_image({"type": "image_url", "image_url": {"url": url}}, "trajectory image")
        scheme, sep, rest = url.partition(":")
        if not sep or scheme not in self.resolvers:
            raise ValueError(f"image reference {url[:60]!r}: not a data URI and no resolver for scheme {scheme!r} "
                             f"(registered: {sorted(self.resolvers)})")
        return np.asarray(self.resolvers[scheme](rest), np.uint8)

    def _processed(self, url: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        px = preprocess_images([self.image(url)], patch_size=self.patch_size, merge_size=self.merge_size)
        t, h, w = (int(v) for v in px["image_grid_thw"][0])
        return np.asarray(px["pixel_values"], np.float32).reshape(t * h * w, -1), (t, h, w)

    def tokens(self, url: str) -> int:
        """Merged vision tokens (placeholders in the text) of one image."""
        t, h, w = self.processed(url)[1]
        return t * h * w // (self.merge_size * self.merge_size)

    def pixels(self, urls: Sequence[str]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
        """(patches, grid) per image, in order: the layout `k25.train.joint.stack_rows` takes."""
        return [self.processed(u) for u in urls]

    def request_media(self, urls: Sequence[str]) -> dict[str, Any]:
        """The sampler request's `pixel_values` / `grid_thw` for these images ({} when there are none)."""
        if not urls:
            return {}
        items = self.pixels(urls)
        return {"pixel_values": np.concatenate([p for p, _ in items]), "grid_thw": [g for _, g in items]}
