"""Vision rewards on geometry, all in pixels: grounding (boxes), pointing (points), segmentation (polygons).

Grounding and pointing use the report's "F1 with soft matching under optimal matching": predictions and
targets are matched one to one by the Hungarian algorithm (scipy's `linear_sum_assignment`) maximising the
total match score s_ij in [0, 1]; the soft true-positive count is TP = sum of the matched scores, so

    precision = TP / P,  recall = TP / G,  F1 = 2 P R / (P + R) = 2 TP / (P + G)

(P predictions, G targets). Duplicates can match only once, extra predictions lower precision, and an empty
prediction scores 0 (1 when there are no targets either).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def _array(name: str, xs: Sequence, width: int, what: str) -> np.ndarray:
    a = np.asarray(list(xs), dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, width))
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} has shape {a.shape}; expected a list of {what}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite coordinates")
    return a


def soft_f1(scores: np.ndarray) -> float:
    """2 TP / (P + G) with TP the best one-to-one total of `scores` (P x G, entries in [0, 1])."""
    p, g = scores.shape
    if p + g == 0:
        return 1.0
    if p == 0 or g == 0:
        return 0.0
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return float(2.0 * scores[rows, cols].sum() / (p + g))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (P, 4) and (G, 4) boxes (x1, y1, x2, y2); a box with x2 <= x1 or y2 <= y1 has zero
    area and IoU 0 with everything."""
    ax1, ay1, ax2, ay2 = (a[:, i:i + 1] for i in range(4))
    bx1, by1, bx2, by2 = (b[None, :, i] for i in range(4))
    iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    area_a = np.clip(ax2 - ax1, 0, None) * np.clip(ay2 - ay1, 0, None)
    area_b = np.clip(bx2 - bx1, 0, None) * np.clip(by2 - by1, 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def grounding_f1(pred_boxes: Sequence, gt_boxes: Sequence, iou_threshold: float = 0.5) -> float:
    """Soft-match F1 of boxes: s_ij = IoU(pred_i, gt_j) if IoU >= iou_threshold else 0 (a miss), matched one
    to one to maximise the total; F1 = 2 * sum(matched s) / (P + G)."""
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold}: must be in [0, 1]")
    p = _array("pred_boxes", pred_boxes, 4, "(x1, y1, x2, y2) boxes")
    g = _array("gt_boxes", gt_boxes, 4, "(x1, y1, x2, y2) boxes")
    iou = box_iou(p, g)
    return soft_f1(np.where(iou >= iou_threshold, iou, 0.0))


def point_f1(pred_points: Sequence, gt_points: Sequence, sigma: float) -> float:
    """Soft-match F1 of points: s_ij = exp(-|p_i - g_j|^2 / (2 sigma^2)) (sigma in pixels), matched one to
    one to maximise the total; F1 = 2 * sum(matched s) / (P + G)."""
    if not sigma > 0:
        raise ValueError(f"sigma={sigma}: must be > 0 (pixels)")
    p = _array("pred_points", pred_points, 2, "(x, y) points")
    g = _array("gt_points", gt_points, 2, "(x, y) points")
    d2 = ((p[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return soft_f1(np.exp(-d2 / (2.0 * sigma**2)))


def _raster(poly: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("1", (w, h), 0)
    if len(poly) >= 3:
        ImageDraw.Draw(img).polygon([tuple(v) for v in poly.tolist()], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def polygon_iou(pred: Sequence, gt: Sequence, *, image_size: tuple[int, int] | None = None) -> float:
    """IoU = area(pred ∩ gt) / area(pred ∪ gt) of two polygons given as vertex lists [(x, y), ...].

    Exact geometry with shapely by default; a self-intersecting prediction is repaired with
    `shapely.make_valid` (a bow-tie becomes its two triangles) and a prediction with fewer than three
    vertices or zero area scores 0. With `image_size=(width, height)` both polygons are rasterised to binary
    masks (Pillow) and the mask IoU is returned: the report's segmentation reward.
    """
    p = _array("pred", pred, 2, "(x, y) vertices")
    g = _array("gt", gt, 2, "(x, y) vertices")
    if len(g) < 3:
        raise ValueError(f"gt has {len(g)} vertices; a target polygon needs at least 3")
    if image_size is not None:
        mp, mg = _raster(p, image_size), _raster(g, image_size)
        union = np.logical_or(mp, mg).sum()
        if not mg.any():
            raise ValueError(f"gt rasterises to an empty mask in image_size={image_size}")
        return float(np.logical_and(mp, mg).sum() / union)
    import shapely
    from shapely.geometry import Polygon

    gp = shapely.make_valid(Polygon(g))
    if gp.area <= 0:
        raise ValueError("gt polygon has zero area")
    if len(p) < 3:
        return 0.0
    pp = shapely.make_valid(Polygon(p))
    if pp.area <= 0:
        return 0.0
    union = pp.union(gp).area
    return float(pp.intersection(gp).area / union)
