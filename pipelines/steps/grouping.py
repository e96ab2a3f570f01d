"""Weight-free region proposals: watershed superpixels, then hierarchical grouping in the manner of selective search
(Uijlings et al., IJCV 2013), with the structure map's edges as a boundary cue.

The image is reduced to ``work_side`` pixels on its long side and cut into superpixels by OpenCV's watershed
(compiled) flooded from a grid of seeds every ``seed_step`` work pixels: each superpixel follows the colour edges
around its seed. Neighbouring regions are then merged, most similar first, until one region is left; every
superpixel and every merge is a candidate box. Similarity of neighbours a, b (each term in 0..1):

    colour  = sum(min(hist_a, hist_b))                  colour histograms (25 bins per channel, L1-normalised)
    size    = 1 - (size_a + size_b) / image             small regions merge first
    fill    = 1 - (box(a u b) - size_a - size_b) / image  regions whose union fills its box merge first
    edge    = 1 - edge pixels on the a|b boundary / boundary length   (structure map; 1 without one)

The merging is vectorised (NumPy) in rounds: each round merges every pair of regions that are each other's most
similar neighbour (reciprocal best pairs), which is the pair selective search would merge next and, where merges do
not interact, the ones after it. The strategies run together as one graph of disjoint copies, so a round costs the
same few array operations for all of them.

A candidate's score says how well it stands out from what surrounds it: the mean, over its boundary, of the colour
difference to the neighbour across it (1 - histogram intersection) when it is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

VERSION = "2"

BINS = 25


@dataclass(frozen=True)
class Proposals:
    """Candidate boxes in the input image's pixels: ``boxes`` (N, 4) int64 xyxy (x2/y2 exclusive), ``scores``
    (N,) float64 (higher is more object-like) and ``area_fractions`` (N,) float64 (box area / image area)."""

    boxes: np.ndarray
    scores: np.ndarray
    area_fractions: np.ndarray


@dataclass(frozen=True)
class _Weights:
    colour: float
    size: float
    fill: float
    edge: float


# (colour space of the histograms, similarity weights): two complementary strategies, as selective search's
# "fast" mode combines colour spaces and similarity measures: one groups by colour, one by shape and edges.
STRATEGIES = (
    ("lab", _Weights(colour=1.0, size=1.0, fill=1.0, edge=0.0)),
    ("hsv", _Weights(colour=0.0, size=1.0, fill=1.0, edge=1.0)),
)


def work_image(rgb: np.ndarray, work_side: int) -> np.ndarray:
    """Return ``rgb`` ((H, W, 3) uint8) reduced by area averaging to ``work_side`` px on its long side (never
    enlarged)."""
    height, width = rgb.shape[:2]
    factor = min(1.0, work_side / max(height, width))
    if factor >= 1:
        return rgb
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def superpixels(work: np.ndarray, seed_step: int) -> np.ndarray:
    """Return the (h, w) int64 superpixel labels 0..n-1 of ``work`` ((h, w, 3) uint8): watershed from a grid of
    seeds ``seed_step`` px apart; watershed's boundary pixels join the neighbour closest in colour."""
    height, width = work.shape[:2]
    if height < 3 or width < 3:
        return np.zeros((height, width), np.int64)
    # Seeds off the one-pixel frame (watershed overwrites it), at least one per axis.
    ys = np.unique(np.clip(np.arange(seed_step // 2, max(height, seed_step // 2 + 1), seed_step), 1, height - 2))
    xs = np.unique(np.clip(np.arange(seed_step // 2, max(width, seed_step // 2 + 1), seed_step), 1, width - 2))
    markers = np.zeros((height, width), np.int32)
    markers[np.ix_(ys, xs)] = np.arange(1, ys.size * xs.size + 1, dtype=np.int32).reshape(ys.size, xs.size)
    cv2.watershed(np.ascontiguousarray(work), markers)  # in place; boundaries and the outer frame become -1
    # The frame takes the labels just inside it (rows first, so the corners get the diagonal neighbour's).
    markers[0, :], markers[-1, :] = markers[1, :], markers[-2, :]
    markers[:, 0], markers[:, -1] = markers[:, 1], markers[:, -2]
    colour = work.astype(np.int32)
    # OpenCV's flood fixes a pixel's priority when a neighbour first queues it, so a basin can take a few pixels
    # across a colour edge (corners of flat shapes); and its watershed lines belong to no basin. Each pixel on a
    # boundary goes to the superpixel, among its own and its 4 neighbours', of the nearest mean colour.
    for _ in range(REFINE_PASSES):
        _refine_boundaries(markers, colour)
    for _ in range(height + width):  # watershed pixels with no labelled neighbour yet (junctions of lines): rare
        if (markers >= 1).all():
            break
        _refine_boundaries(markers, colour, unlabelled_only=True)
    # Seeds overwritten by the frame leave gaps in the numbering: renumber 0..n-1.
    present = np.bincount(markers.reshape(-1))
    return (np.cumsum(present > 0) - 1)[markers]


REFINE_PASSES = 2


def _refine_boundaries(labels: np.ndarray, colour: np.ndarray, unlabelled_only: bool = False) -> None:
    """Move each pixel that has a 4-neighbour of another label, or none (-1, 0), to the label among its own and its
    neighbours' (never -1 or 0) whose mean colour is nearest its own in L1; with ``unlabelled_only`` only the pixels
    with none. In place; ties keep the first of own, up, left, right, down."""
    flat = labels.reshape(-1) + 1  # -1 (watershed line) and 0 (not reached) have an unreachable mean
    counts = np.bincount(flat)
    sums = np.stack([np.bincount(flat, weights=colour[..., c].reshape(-1), minlength=counts.size)
                     for c in range(3)], axis=1)
    means = (sums / np.maximum(counts, 1)[:, None]).round().astype(np.int16)
    means[:2] = 3000  # 3 x 3000 + 255 still fits int16 sums below
    padded = np.pad(labels, 1, mode="edge")
    around = (padded[0:-2, 1:-1], padded[1:-1, 0:-2], padded[1:-1, 2:], padded[2:, 1:-1])
    boundary = labels < 1
    if not unlabelled_only:
        for neighbour in around:
            boundary |= neighbour != labels
    ys, xs = np.nonzero(boundary)
    # Channels apart: 1-D int16 arithmetic (a sum over a 3-wide axis is several times slower).
    pixel = [colour[ys, xs, c].astype(np.int16) for c in range(3)]
    channel_means = [np.ascontiguousarray(means[:, c]) for c in range(3)]

    def distance_to(label: np.ndarray) -> np.ndarray:
        index = label + 1
        total = np.abs(channel_means[0][index] - pixel[0])
        total += np.abs(channel_means[1][index] - pixel[1])
        total += np.abs(channel_means[2][index] - pixel[2])
        return total

    best = labels[ys, xs]
    best_distance = distance_to(best)
    for neighbour in around:
        candidate = neighbour[ys, xs]
        distance = distance_to(candidate)
        nearer = distance < best_distance
        best[nearer], best_distance[nearer] = candidate[nearer], distance[nearer]
    labels[ys, xs] = best


def _colour_histograms(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Return (n, 3 * BINS) float64 colour histograms of each label, each row summing to 1."""
    bins = (image.reshape(-1, 3).astype(np.int64) * BINS) // 256 + np.arange(3) * BINS  # (P, 3) bin of each channel
    index = labels.reshape(-1, 1) * (3 * BINS) + bins
    hist = np.bincount(index.reshape(-1), minlength=n * 3 * BINS).reshape(n, 3 * BINS).astype(np.float64)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0)


def _label_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """Return (n, 4) int64 xyxy boxes (x2/y2 exclusive) of each label of an (H, W) label image (every label
    present)."""
    height, width = labels.shape
    rows = np.zeros((n, height), bool)
    rows[labels, np.arange(height)[:, None]] = True
    cols = np.zeros((n, width), bool)
    cols[labels, np.arange(width)[None, :]] = True
    return np.stack([cols.argmax(axis=1), rows.argmax(axis=1), width - cols[:, ::-1].argmax(axis=1),
                     height - rows[:, ::-1].argmax(axis=1)], axis=1).astype(np.int64)


@dataclass(frozen=True)
class _Boundaries:
    """Neighbouring label pairs ``a < b`` ((E,) int64 each), their shared boundary length and the structure-map
    edge pixels on it ((E,) float64 each)."""

    a: np.ndarray
    b: np.ndarray
    lengths: np.ndarray
    on_edge: np.ndarray


def _boundaries(labels: np.ndarray, edges: np.ndarray | None, n: int) -> _Boundaries:
    """Return the 4-neighbour boundaries between the labels of an (H, W) label image."""
    keys, on_edge = [], []
    for axis in (1, 0):
        first = labels[:, :-1] if axis == 1 else labels[:-1, :]
        second = labels[:, 1:] if axis == 1 else labels[1:, :]
        differ = first != second
        a, b = first[differ], second[differ]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
        if edges is not None:
            across = (edges[:, :-1] | edges[:, 1:]) if axis == 1 else (edges[:-1, :] | edges[1:, :])
            on_edge.append(across[differ])
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    lengths = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    edge_counts = (np.bincount(inverse, weights=np.concatenate(on_edge), minlength=unique.size) if edges is not None
                   else np.zeros_like(lengths))
    return _Boundaries(unique // n, unique % n, lengths, edge_counts)


def _hierarchy(
    hists: list[np.ndarray],
    weights: list[_Weights],
    sizes: np.ndarray,
    boxes: np.ndarray,
    boundaries: _Boundaries,
    total: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring regions (most similar first) once per strategy (its histograms and weights); return every
    region's box (M, 4) int64 and score (M,) float64, all strategies together."""
    n, count = len(sizes), len(hists)
    capacity = 2 * n - 1  # ids of one strategy: n superpixels, then n - 1 merges
    ids = capacity * count
    offsets = np.arange(count) * capacity
    hist = np.zeros((ids, hists[0].shape[1]), np.float32)
    size = np.zeros(ids)
    box = np.zeros((ids, 4), np.int64)
    weight = np.zeros((ids, 4))
    for strategy, offset in enumerate(offsets):
        hist[offset:offset + n] = hists[strategy]
        size[offset:offset + n] = sizes
        box[offset:offset + n] = boxes
        w = weights[strategy]
        weight[offset:offset + capacity] = (w.colour, w.size, w.fill, w.edge)
    scores = np.zeros(ids)

    def pairs_of(a: np.ndarray, b: np.ndarray, lengths: np.ndarray, on_edge: np.ndarray,
                 formed: np.ndarray) -> np.ndarray:
        """Return the similarity of pairs (a, b); score the ``formed`` regions, all of whose pairs these are."""
        intersection = np.minimum(hist[a], hist[b]).sum(axis=1, dtype=np.float64)
        # Score: length-weighted colour difference to the neighbours (float32 sums can pass 1: clipped).
        difference = lengths * (1.0 - intersection)
        spread = np.bincount(a, difference, ids) + np.bincount(b, difference, ids)
        boundary = (np.bincount(a, lengths, ids) + np.bincount(b, lengths, ids))[formed]
        scores[formed] = np.where(boundary > 0, np.clip(spread[formed] / np.where(boundary > 0, boundary, 1.0),
                                                        0.0, 1.0), 0.0)
        union = ((np.maximum(box[a, 2], box[b, 2]) - np.minimum(box[a, 0], box[b, 0]))
                 * (np.maximum(box[a, 3], box[b, 3]) - np.minimum(box[a, 1], box[b, 1])))
        joint = size[a] + size[b]
        w = weight[a]
        return (w[:, 0] * intersection + w[:, 1] * (1.0 - joint / total)
                + w[:, 2] * (1.0 - (union - joint) / total) + w[:, 3] * (1.0 - on_edge / lengths))

    a = np.concatenate([boundaries.a + offset for offset in offsets])
    b = np.concatenate([boundaries.b + offset for offset in offsets])
    lengths = np.tile(boundaries.lengths, count)
    on_edge = np.tile(boundaries.on_edge, count)
    similarity = pairs_of(a, b, lengths, on_edge, np.concatenate([np.arange(n) + offset for offset in offsets]))
    next_id = offsets + n
    while a.size:
        # Rank pairs by (similarity desc, position): a strict order, so its first pair is always reciprocal.
        rank = np.empty(a.size, np.int64)
        rank[np.argsort(-similarity, kind="stable")] = np.arange(a.size)
        best = np.full(ids, a.size, np.int64)
        np.minimum.at(best, a, rank)
        np.minimum.at(best, b, rank)
        merge = (best[a] == rank) & (best[b] == rank)
        first, second = a[merge], b[merge]
        order = np.argsort(first // capacity, kind="stable")  # grouped by strategy: ids are numbered per strategy
        first, second = first[order], second[order]
        per_strategy = np.bincount(first // capacity, minlength=count)
        new = np.repeat(next_id, per_strategy) + np.arange(first.size) - np.repeat(
            np.cumsum(per_strategy) - per_strategy, per_strategy)
        next_id = next_id + per_strategy
        size[new] = size[first] + size[second]
        hist[new] = (hist[first] * size[first, None] + hist[second] * size[second, None]) / size[new, None]
        box[new, :2] = np.minimum(box[first, :2], box[second, :2])
        box[new, 2:] = np.maximum(box[first, 2:], box[second, 2:])
        # Pairs between untouched regions keep their similarity; pairs of a merged region become pairs of the new
        # one (boundaries added up where two join the same neighbour) and are measured again.
        relabel = np.arange(ids)
        relabel[first], relabel[second] = new, new
        new_a, new_b = relabel[a], relabel[b]
        same = (new_a == a) & (new_b == b)
        moved = ~same & (new_a != new_b)
        keys, inverse = np.unique(np.minimum(new_a[moved], new_b[moved]) * ids + np.maximum(new_a[moved], new_b[moved]),
                                  return_inverse=True)
        moved_lengths = np.bincount(inverse, lengths[moved], keys.size)
        moved_on_edge = np.bincount(inverse, on_edge[moved], keys.size)
        moved_a, moved_b = keys // ids, keys % ids
        moved_similarity = pairs_of(moved_a, moved_b, moved_lengths, moved_on_edge, new)
        a, b = np.concatenate([a[same], moved_a]), np.concatenate([b[same], moved_b])
        lengths = np.concatenate([lengths[same], moved_lengths])
        on_edge = np.concatenate([on_edge[same], moved_on_edge])
        similarity = np.concatenate([similarity[same], moved_similarity])
    used = np.concatenate([np.arange(offset, end) for offset, end in zip(offsets, next_id)])
    return box[used], scores[used]


def grouping_boxes(
    rgb: np.ndarray,
    structure_map: np.ndarray | None = None,
    *,
    work_side: int = 192,
    seed_step: int = 12,
) -> Proposals:
    """Return candidate boxes of ``rgb`` ((H, W, 3) uint8) from hierarchical grouping of its superpixels.

    ``structure_map`` ((h, w) uint8 edges of the same image, any size) adds the boundary-edge cue.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    work = work_image(rgb, work_side)
    work_h, work_w = work.shape[:2]
    edges = None
    if structure_map is not None:
        # Area averaging keeps thin edges (as grey) that a nearest-pixel resize would drop.
        edges = cv2.resize(structure_map, (work_w, work_h), interpolation=cv2.INTER_AREA) > 0
    labels = superpixels(work, seed_step)
    n = int(labels.max()) + 1
    spaces = {"lab": cv2.COLOR_RGB2Lab, "hsv": cv2.COLOR_RGB2HSV_FULL}
    hists = [_colour_histograms(cv2.cvtColor(work, spaces[space]), labels, n) for space, _ in STRATEGIES]
    boxes, scores = _hierarchy(
        hists, [w for _, w in STRATEGIES], np.bincount(labels.reshape(-1), minlength=n).astype(np.float64),
        _label_boxes(labels, n), _boundaries(labels, edges, n), float(work_w * work_h),
    )
    # Unique boxes only (strategies find the same ones), keeping the best score of each.
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes, scores = boxes[first], scores[first]
    scaled = boxes.astype(np.float64) / np.array([work_w, work_h, work_w, work_h]) * [width, height, width, height]
    out = np.concatenate([np.floor(scaled[:, :2]), np.ceil(scaled[:, 2:])], axis=1).astype(np.int64)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    areas = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]) / float(width * height)
    return Proposals(boxes=out, scores=scores, area_fractions=areas.astype(np.float64))
