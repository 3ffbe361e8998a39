"""SSD-VGG output decoding in numpy (seed: ``azureml.accel._external.ssdvgg_utils``, itself
adapted from Paul Balanca's SSD-Tensorflow ``np_methods``, Apache-2.0).

Decisions relative to the seed (SEED_API §2.8, §5.9):

* ``select_threshold`` and ``nms_threshold`` are honoured (the seed hard-coded 0.5 / 0.45 and
  ignored its arguments). The defaults are the same, so default calls give the same result.
* Inputs with or without the batch dimension are accepted: 5-D arrays [N,H,W,A,C] or 4-D
  [H,W,A,C] (the seed failed with AxisError on 4-D). Each image is decoded on its own (the seed
  was only correct for batch 1). A batch of one, or 4-D input, returns one
  ``(classes, scores, bboxes)`` tuple as the seed; a batch of N > 1 returns a list of N tuples.
* The anchors are computed lazily (the seed computed them at import time as a default
  argument); ``ssd_anchors=None`` means ``compute_anchors()``.
* ``np.bool`` is not used (it broke on numpy 1.24-1.26).
* The final "resize against [0,0,1,1]" of the seed is the identity and is left out.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ANCHOR_SIZES",
    "ANCHOR_RATIOS",
    "ANCHOR_STEPS",
    "PRIOR_SCALING",
    "feature_shapes",
    "compute_anchors",
    "decode_layer_boxes",
    "postprocess",
]

#: (min, max) anchor size per source layer, pixels of the 300x300 input.
ANCHOR_SIZES = ((21.0, 45.0), (45.0, 99.0), (99.0, 153.0), (153.0, 207.0), (207.0, 261.0), (261.0, 315.0))
#: Extra aspect ratios per source layer.
ANCHOR_RATIOS = ((2, 0.5), (2, 0.5, 3, 1.0 / 3), (2, 0.5, 3, 1.0 / 3), (2, 0.5, 3, 1.0 / 3), (2, 0.5), (2, 0.5))
#: Anchor step (pixels) per source layer.
ANCHOR_STEPS = (8, 16, 32, 64, 100, 300)
#: Box-offset scaling (cx, cy, w, h).
PRIOR_SCALING = (0.1, 0.1, 0.2, 0.2)

Anchor = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Detections = Tuple[np.ndarray, np.ndarray, np.ndarray]


def feature_shapes(img_shape: Tuple[int, int] = (300, 300)) -> List[Tuple[int, int]]:
    """Grid sizes of the six source layers of ``bfpaccel.models.SsdVgg`` for an input size:
    pool1-3 floor, pool4 ceil, block8/9 pad-1 stride-2 VALID, block10/11 3x3 VALID.

    Example:
        >>> feature_shapes()
        [(37, 37), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    """
    def one(n: int) -> List[int]:
        n = n // 2 // 2 // 2          # pool1-3, VALID
        b4 = n
        b7 = -(-n // 2)               # pool4, SAME (ceil)
        b8 = (b7 + 2 - 3) // 2 + 1
        b9 = (b8 + 2 - 3) // 2 + 1
        b10 = b9 - 2
        b11 = b10 - 2
        return [b4, b7, b8, b9, b10, b11]

    hs, ws = one(int(img_shape[0])), one(int(img_shape[1]))
    if min(hs + ws) < 1:
        raise ValueError(f"image shape {img_shape} is too small for SSD-VGG")
    return list(zip(hs, ws))


def compute_anchors(img_shape: Tuple[int, int] = (300, 300)) -> List[Anchor]:
    """Default anchors per source layer, as ``(y, x, h, w)`` in [0,1] units of the input:
    ``y, x`` are [H,W,1] cell centres ``(i+0.5)*step/300``, ``h, w`` [A] sizes (anchor 0: the
    min size; anchor 1: ``sqrt(min*max)``; then ``min/sqrt(r)``, ``min*sqrt(r)`` per ratio).

    Example:
        >>> a = compute_anchors()
        >>> [l[2].size for l in a], sum(l[0].size * l[2].size for l in a)
        ([4, 6, 6, 6, 4, 4], 8432)
    """
    img_h, img_w = float(img_shape[0]), float(img_shape[1])
    out: List[Anchor] = []
    for (fh, fw), (s0, s1), ratios, step in zip(feature_shapes(img_shape), ANCHOR_SIZES, ANCHOR_RATIOS, ANCHOR_STEPS):
        y, x = np.mgrid[0:fh, 0:fw].astype(np.float32)
        y = ((y + 0.5) * step / img_h)[..., None].astype(np.float32)
        x = ((x + 0.5) * step / img_w)[..., None].astype(np.float32)
        n = 2 + len(ratios)
        h = np.zeros((n,), np.float32)
        w = np.zeros((n,), np.float32)
        h[0], w[0] = s0 / img_h, s0 / img_w
        h[1], w[1] = math.sqrt(s0 * s1) / img_h, math.sqrt(s0 * s1) / img_w
        for i, r in enumerate(ratios):
            h[i + 2] = s0 / img_h / math.sqrt(r)
            w[i + 2] = s0 / img_w * math.sqrt(r)
        out.append((y, x, h, w))
    return out


def decode_layer_boxes(localizations: np.ndarray, anchors: Anchor,
                       prior_scaling: Sequence[float] = PRIOR_SCALING) -> np.ndarray:
    """Decode one layer's offsets ``(dx, dy, dw, dh)`` [..., H, W, A, 4] against its anchors into
    boxes ``[ymin, xmin, ymax, xmax]`` (same leading shape): ``cx = dx*wa*0.1 + xa``,
    ``cy = dy*ha*0.1 + ya``, ``w = wa*exp(dw*0.2)``, ``h = ha*exp(dh*0.2)``.

    Example:
        >>> a = compute_anchors()[5]
        >>> [round(float(v), 3) for v in decode_layer_boxes(np.zeros((1, 1, 4, 4), np.float32), a)[0, 0, 0]]
        [0.065, 0.065, 0.935, 0.935]
    """
    loc = np.asarray(localizations, dtype=np.float32)
    if loc.shape[-1] != 4:
        raise ValueError(f"localizations must end in 4 (dx, dy, dw, dh), got shape {loc.shape}")
    yref, xref, href, wref = anchors
    cx = loc[..., 0] * wref * prior_scaling[0] + xref
    cy = loc[..., 1] * href * prior_scaling[1] + yref
    w = wref * np.exp(loc[..., 2] * prior_scaling[2])
    h = href * np.exp(loc[..., 3] * prior_scaling[3])
    return np.stack([cy - h / 2.0, cx - w / 2.0, cy + h / 2.0, cx + w / 2.0], axis=-1).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _jaccard(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ymin = np.maximum(boxes[:, 0], box[0])
    xmin = np.maximum(boxes[:, 1], box[1])
    ymax = np.minimum(boxes[:, 2], box[2])
    xmax = np.minimum(boxes[:, 3], box[3])
    inter = np.maximum(ymax - ymin, 0.0) * np.maximum(xmax - xmin, 0.0)
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _nms(classes: np.ndarray, scores: np.ndarray, bboxes: np.ndarray, threshold: float) -> np.ndarray:
    keep = np.ones(scores.shape, dtype=bool)
    for i in range(scores.size - 1):
        if keep[i]:
            overlap = _jaccard(bboxes[i], bboxes[i + 1:])
            keep[i + 1:] &= (overlap < threshold) | (classes[i + 1:] != classes[i])
    return keep


def _one_image(logits: Sequence[np.ndarray], locs: Sequence[np.ndarray], anchors: Sequence[Anchor],
               select_threshold: float, nms_threshold: float, top_k: int) -> Detections:
    all_c, all_s, all_b = [], [], []
    for lg, lc, an in zip(logits, locs, anchors):
        probs = _softmax(np.asarray(lg, np.float32)).reshape(-1, lg.shape[-1])[:, 1:]
        boxes = decode_layer_boxes(lc, an).reshape(-1, 4)
        anchor_idx, cls_idx = np.nonzero(probs > select_threshold)
        all_c.append(cls_idx + 1)
        all_s.append(probs[anchor_idx, cls_idx])
        all_b.append(boxes[anchor_idx])
    classes = np.concatenate(all_c).astype(np.int64)
    scores = np.concatenate(all_s).astype(np.float32)
    bboxes = np.clip(np.concatenate(all_b), 0.0, 1.0).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:top_k]
    classes, scores, bboxes = classes[order], scores[order], bboxes[order]
    keep = _nms(classes, scores, bboxes, nms_threshold)
    return classes[keep], scores[keep], bboxes[keep]


def postprocess(network_output: Sequence[np.ndarray], ssd_anchors: Optional[Sequence[Anchor]] = None,
                select_threshold: float = 0.5, nms_threshold: float = 0.45,
                top_k: int = 400) -> Union[Detections, List[Detections]]:
    """Turn the 12 SSD outputs (6 class-logit tensors, then 6 offset tensors, as
    ``SsdVgg.import_graph_def`` returns them) into ``(classes, scores, bboxes)``: softmax per
    anchor; keep each (anchor, class >= 1) with score > ``select_threshold`` (one anchor may give
    several classes); clip boxes to [0,1]; sort by score, keep ``top_k``; greedy NMS per class at
    IoU ``nms_threshold``. Boxes are ``[ymin, xmin, ymax, xmax]`` in [0,1] of the stretched
    input (multiply by the original height/width). Accepts 5-D (with batch) or 4-D arrays; a
    batch of N > 1 gives a list of N tuples (see the module docstring).

    Example:
        >>> outs = [np.zeros((1, g, g, a, 21), np.float32) for g, a in zip((37, 19, 10, 5, 3, 1), (4, 6, 6, 6, 4, 4))]
        >>> outs += [np.zeros(o.shape[:-1] + (4,), np.float32) for o in outs]
        >>> classes, scores, bboxes = postprocess(outs)
        >>> classes.size
        0
    """
    outs = [np.asarray(o) for o in network_output]
    if len(outs) != 12:
        raise ValueError(f"postprocess needs the 12 SSD outputs (6 logits, 6 offsets), got {len(outs)}")
    anchors = compute_anchors() if ssd_anchors is None else list(ssd_anchors)
    if len(anchors) != 6:
        raise ValueError(f"ssd_anchors must have 6 layers, got {len(anchors)}")
    ranks = {o.ndim for o in outs}
    if ranks == {4}:
        outs = [o[None] for o in outs]
        batched = False
    elif ranks == {5}:
        batched = True
    else:
        raise ValueError(f"SSD outputs must all be 5-D [N,H,W,A,C] or all 4-D [H,W,A,C], got ranks {sorted(ranks)}")
    logits, locs = outs[:6], outs[6:]
    for i, (lg, lc, an) in enumerate(zip(logits, locs, anchors)):
        grid = an[0].shape[:2] + an[2].shape
        if lg.shape[1:4] != grid or lc.shape[1:4] != grid or lc.shape[-1] != 4:
            raise ValueError(f"layer {i}: logits {lg.shape[1:]} / offsets {lc.shape[1:]} do not match the "
                             f"anchors' grid {grid} (order: 6 logits, then 6 offsets)")
    n = logits[0].shape[0]
    results = [_one_image([lg[b] for lg in logits], [lc[b] for lc in locs], anchors,
                          float(select_threshold), float(nms_threshold), int(top_k)) for b in range(n)]
    if not batched or n == 1:
        return results[0]
    return results
