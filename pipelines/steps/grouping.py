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
same few array operations for all of them; ``grouping_boxes_many`` adds several images to that graph, each getting
what it gets alone.

A candidate's score says how well it stands out from what surrounds it: the mean, over its boundary, of the colour
difference to the neighbour across it (1 - histogram intersection) when it is formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

VERSION = "4"

BINS = 25
# Seeds of the watershed superpixels: one every SEED_STEP work pixels (version 4; 16 in version 3, 12 before).
SEED_STEP = 18


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
    colour = _PixelColours(work)
    # OpenCV's flood fixes a pixel's priority when a neighbour first queues it, so a basin can take a few pixels
    # across a colour edge (corners of flat shapes); and its watershed lines belong to no basin. Each pixel on a
    # boundary goes to the superpixel, among its own and its 4 neighbours', of the nearest mean colour.
    for _ in range(REFINE_PASSES):
        _refine_boundaries(markers, colour)
    for _ in range(height + width):  # watershed pixels with no labelled neighbour yet (junctions of lines): rare
        if markers.min() >= 1:
            break
        _refine_boundaries(markers, colour, unlabelled_only=True)
    # Seeds overwritten by the frame leave gaps in the numbering: renumber 0..n-1.
    present = np.bincount(markers.reshape(-1))
    return (np.cumsum(present > 0) - 1)[markers]


# Passes of the boundary refinement. A second pass (version 3) found no more objects on 1,450 in five scene sets
# (1,372 with two, 1,375 with one, at 18 px seeds) nor on the sample photos, for ~0.5 CPU-ms per image.
REFINE_PASSES = 1


class _PixelColours:
    """The channels of an (h, w, 3) uint8 image, flat: as float64 (bincount weights) and int16 (distances)."""

    def __init__(self, work: np.ndarray) -> None:
        channels = np.ascontiguousarray(work.reshape(-1, 3).T)  # (3, P)
        self.weights = channels.astype(np.float64)
        self.values = channels.astype(np.int16)


def _refine_boundaries(labels: np.ndarray, colour: _PixelColours, unlabelled_only: bool = False) -> None:
    """Move each pixel that has a 4-neighbour of another label, or none (-1, 0), to the label among its own and its
    neighbours' (never -1 or 0) whose mean colour is nearest its own in L1; with ``unlabelled_only`` only the pixels
    with none. In place (``labels``: (h, w) int32); ties keep the first of own, up, left, right, down."""
    height, width = labels.shape
    flat = labels.reshape(-1).astype(np.intp) + 1  # -1 (watershed line) and 0 (not reached): unreachable mean
    counts = np.bincount(flat)
    divisor = np.maximum(counts, 1)
    means = np.empty((3, counts.size), np.int16)
    for c in range(3):
        means[c] = (np.bincount(flat, weights=colour.weights[c], minlength=counts.size) / divisor).round()
    means[:, :2] = 3000  # 3 x 3000 + 255 still fits int16 sums below
    # Edge-replicated frame: outside the image a pixel's neighbour is itself.
    padded = cv2.copyMakeBorder(labels, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    if unlabelled_only:
        inside = np.flatnonzero(flat < 2)
    else:
        # A pixel on a boundary: the largest and smallest label among it and its 4 neighbours differ.
        cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        as_float = padded.astype(np.float64)  # exact for any label count
        spread = cv2.dilate(as_float, cross)[1:-1, 1:-1] != cv2.erode(as_float, cross)[1:-1, 1:-1]
        inside = np.flatnonzero(spread.reshape(-1) | (flat < 2))
    # Own, up, left, right, down label of each of those pixels, from the padded image's flat index.
    stride = width + 2
    at = inside + (inside // width) * 2 + stride + 1
    candidates = padded.reshape(-1).take(at + _NEIGHBOUR_STEPS * stride + _NEIGHBOUR_SHIFTS)  # (5, K)
    index = candidates + 1
    distance = np.abs(means[0].take(index) - colour.values[0].take(inside))
    distance += np.abs(means[1].take(index) - colour.values[1].take(inside))
    distance += np.abs(means[2].take(index) - colour.values[2].take(inside))
    # The nearest with the first on ties: the smallest of distance * 8 + candidate's position (int32: <= 9000 * 8).
    key = distance.astype(np.int32) * 8 + _NEIGHBOUR_ORDER
    position = key.min(axis=0) & 7
    labels.reshape(-1)[inside] = candidates.reshape(-1).take(position * inside.size + np.arange(inside.size))


# Own, up, left, right, down: rows apart and columns apart in a flat image, and their order as tie-breaker.
_NEIGHBOUR_STEPS = np.array([[0], [-1], [0], [0], [1]])
_NEIGHBOUR_SHIFTS = np.array([[0], [0], [-1], [1], [0]])
_NEIGHBOUR_ORDER = np.arange(5, dtype=np.int32)[:, None]


def _colour_histograms(images: list[np.ndarray], labels: np.ndarray, n: int) -> list[np.ndarray]:
    """Return the (n, 3 * BINS) float64 colour histograms of each label in each image (each row summing to 1): one
    bincount over every channel of every image."""
    channels = 3 * len(images)
    binned = np.concatenate([cv2.LUT(image, _bin_table(3 * i)) for i, image in enumerate(images)], axis=2)
    index = labels[..., None] * (channels * BINS) + binned
    counts = np.bincount(index.reshape(-1), minlength=n * channels * BINS).reshape(n, channels * BINS)
    hists = []
    for i in range(len(images)):
        hist = counts[:, 3 * BINS * i:3 * BINS * (i + 1)].astype(np.float64)
        hists.append(hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0))
    return hists


def _bin_table(first_channel: int) -> np.ndarray:
    """Return the (1, 256, 3) uint16 lookup table of the histogram bin of each value of 3 channels, channel
    ``first_channel + c`` getting bins from (first_channel + c) * BINS."""
    bins = np.arange(256) * BINS // 256
    return np.stack([bins + (first_channel + c) * BINS for c in range(3)], axis=1)[None].astype(np.uint16)


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
    keys = np.concatenate(keys)
    if n * n <= _DENSE_KEYS:  # one count per possible pair: no sort
        counts = np.bincount(keys, minlength=n * n)
        unique = np.flatnonzero(counts)
        lengths = counts[unique].astype(np.float64)
        edge_counts = (np.bincount(keys, weights=np.concatenate(on_edge), minlength=n * n)[unique]
                       if edges is not None else np.zeros_like(lengths))
    else:
        unique, inverse = np.unique(keys, return_inverse=True)
        lengths = np.bincount(inverse, minlength=unique.size).astype(np.float64)
        edge_counts = (np.bincount(inverse, weights=np.concatenate(on_edge), minlength=unique.size)
                       if edges is not None else np.zeros_like(lengths))
    return _Boundaries(unique // n, unique % n, lengths, edge_counts)


_DENSE_KEYS = 1 << 20


@dataclass(frozen=True)
class _Graph:
    """One image's superpixels: colour histograms per strategy, sizes and (n, 4) xyxy boxes in work pixels, the
    boundaries between them and the work image's area."""

    hists: list[np.ndarray]
    sizes: np.ndarray
    boxes: np.ndarray
    boundaries: _Boundaries
    total: float


def _hierarchy(graphs: list[_Graph], weights: list[_Weights]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge neighbouring regions (most similar first) once per image and strategy (its histograms and weights);
    return, per image, every region's box (M, 4) int64 and score (M,) float64, all strategies together.

    The images and strategies are disjoint parts of one graph: a round's array operations serve all of them, so
    the rounds' fixed cost (most of it in the last rounds, where few pairs are left) is shared. A part's pairs
    never meet another part's, so each image gets what it would get alone."""
    count = len(weights)
    leaves = np.array([len(graph.sizes) for graph in graphs for _ in range(count)], np.int64)
    offsets = np.cumsum(leaves) - leaves
    # Ids: each part's superpixels (offset .. offset + n - 1, parts in order), then the merges of all parts in the
    # order they form (a part of n superpixels makes at most n - 1). Within a part ids grow with age, which is all
    # the pair order (and so the ranking's tie-break) depends on.
    ids = int((2 * leaves - 1).sum())
    hist = np.zeros((ids, graphs[0].hists[0].shape[1]), np.float32)
    size = np.zeros(ids)
    box = np.zeros((4, ids), np.int64)  # x1, y1, -x2, -y2: the box of a union is the element-wise minimum
    weight = np.zeros((4, ids))
    area = np.ones(ids)  # the image's work area
    part = np.zeros(ids, np.int64)
    ends, measures = [], []
    for index, (offset, n) in enumerate(zip(offsets.tolist(), leaves.tolist())):
        graph, strategy = graphs[index // count], index % count
        at = slice(offset, offset + n)
        hist[at], size[at], area[at], part[at] = graph.hists[strategy], graph.sizes, graph.total, index
        box[:, at] = (graph.boxes * [1, 1, -1, -1]).T
        w = weights[strategy]
        weight[:, at] = np.array([[w.colour], [w.size], [w.fill], [w.edge]])
        ends.append(np.stack([graph.boundaries.a, graph.boundaries.b]) + offset)
        measures.append(np.stack([graph.boundaries.lengths, graph.boundaries.on_edge]))
    # The pairs of each round whose regions formed that round, for the scores (computed once, at the end).
    formed_rounds: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def similarity_of(ends: np.ndarray, measures: np.ndarray, first_formed: int) -> np.ndarray:
        """Return the similarity of the pairs ``ends`` ((2, k) ids, a < b) with ``measures`` ((2, k): boundary
        length and edge pixels on it); keep them for the scores of the regions formed from ``first_formed`` on."""
        a, b = ends
        lengths, on_edge = measures
        intersection = np.minimum(hist.take(a, axis=0), hist.take(b, axis=0)).sum(axis=1, dtype=np.float64)
        formed_rounds.append((first_formed, ends, lengths, intersection))
        union = np.minimum(box.take(a, axis=1), box.take(b, axis=1))
        union_area = (union[2] + union[0]) * (union[3] + union[1])
        joint = size.take(a) + size.take(b)
        total = area.take(a)
        w = weight.take(a, axis=1)
        return (w[0] * intersection + w[1] * (1.0 - joint / total)
                + w[2] * (1.0 - (union_area - joint) / total) + w[3] * (1.0 - on_edge / lengths))

    # (take, compress and slices below: several times faster than fancy indexing on these small arrays)
    ends = np.concatenate(ends, axis=1)
    measures = np.concatenate(measures, axis=1)
    similarity = similarity_of(ends, measures, 0)
    next_id = int(leaves.sum())
    while ends.shape[1]:
        # Rank pairs by (similarity desc, position): a strict order, so its first pair is always reciprocal.
        m = ends.shape[1]
        rank = np.empty(m, np.int64)
        rank[np.argsort(-similarity, kind="stable")] = np.arange(m)
        best = np.full(ids, m, np.int64)
        np.minimum.at(best, ends.reshape(-1), np.concatenate((rank, rank)))
        merge = best.take(ends).min(axis=0) == rank  # each end's best pair is this one
        first, second = ends.compress(merge, axis=1)
        formed, next_id = next_id, next_id + first.size
        new = slice(formed, next_id)
        size_first, size_second = size.take(first), size.take(second)
        joint = size_first + size_second
        size[new] = joint
        hist[new] = (hist.take(first, axis=0) * size_first[:, None]
                     + hist.take(second, axis=0) * size_second[:, None]) / joint[:, None]
        box[:, new] = np.minimum(box.take(first, axis=1), box.take(second, axis=1))
        weight[:, new] = weight.take(first, axis=1)
        area[new] = area.take(first)
        part[new] = part.take(first)
        # Pairs between untouched regions keep their similarity; pairs of a merged region become pairs of the new
        # one (boundaries added up where two join the same neighbour) and are measured again. The merged pairs
        # themselves are the only ones that fall inside one new region.
        relabel = np.arange(ids)
        relabel[first] = relabel[second] = np.arange(formed, next_id)
        renamed = relabel.take(ends)
        touched = (renamed != ends).any(axis=0)
        moved = touched & ~merge
        renamed = renamed.compress(moved, axis=1)
        pairs = np.empty_like(renamed)  # (low, high) ends
        np.minimum(renamed[0], renamed[1], out=pairs[0])
        np.maximum(renamed[0], renamed[1], out=pairs[1])
        keys = pairs[0] * ids + pairs[1]
        order = np.argsort(keys)
        keys = keys.take(order)
        distinct = np.empty(keys.size, bool)
        distinct[:1] = True
        np.not_equal(keys[1:], keys[:-1], out=distinct[1:])
        starts = np.flatnonzero(distinct)
        moved_ends = pairs.take(order.take(starts), axis=1)
        # Boundary lengths and edge counts are whole numbers: their sums are exact in any order.
        moved_measures = np.add.reduceat(measures.compress(moved, axis=1).take(order, axis=1), starts, axis=1)
        moved_similarity = similarity_of(moved_ends, moved_measures, formed)
        kept = ~touched
        ends = np.concatenate([ends.compress(kept, axis=1), moved_ends], axis=1)
        measures = np.concatenate([measures.compress(kept, axis=1), moved_measures], axis=1)
        similarity = np.concatenate([similarity.compress(kept), moved_similarity])
    # Score of a region: the length-weighted colour difference to its neighbours when it formed, from the pairs of
    # its round (as sums over its pairs as first end, then as second end; float32 sums can pass 1: clipped).
    starts = np.concatenate([np.full(e.shape[1], f) for f, e, _, _ in formed_rounds])
    a, b = np.concatenate([e for _, e, _, _ in formed_rounds], axis=1)
    difference = np.concatenate([lengths * (1.0 - intersection) for _, _, lengths, intersection in formed_rounds])
    lengths = np.concatenate([lengths for _, _, lengths, _ in formed_rounds])
    of_a, of_b = a >= starts, b >= starts
    spread = np.bincount(a[of_a], difference[of_a], ids) + np.bincount(b[of_b], difference[of_b], ids)
    boundary = np.bincount(a[of_a], lengths[of_a], ids) + np.bincount(b[of_b], lengths[of_b], ids)
    scores = np.where(boundary > 0, np.clip(spread / np.where(boundary > 0, boundary, 1.0), 0.0, 1.0), 0.0)
    # Per image (its strategies together), in id order.
    boxes = (box[:, :next_id] * np.array([[1], [1], [-1], [-1]])).T
    image = part[:next_id] // count
    order = np.argsort(image, kind="stable")
    bounds = np.searchsorted(image[order], np.arange(len(graphs) + 1))
    return [(np.ascontiguousarray(boxes[order[lo:hi]]), scores[order[lo:hi]]) for lo, hi in zip(bounds, bounds[1:])]


def grouping_boxes(
    rgb: np.ndarray,
    structure_map: np.ndarray | None = None,
    *,
    work_side: int = 192,
    seed_step: int = SEED_STEP,
) -> Proposals:
    """Return candidate boxes of ``rgb`` ((H, W, 3) uint8) from hierarchical grouping of its superpixels.

    ``structure_map`` ((h, w) uint8 edges of the same image, any size) adds the boundary-edge cue. Seed grids, at
    192 px, recall at IoU 0.5 on the benchmark's 100 scenes / on four other sets of 100 generated scenes (seeds
    20,000, 30,000, 40,000 and 60,000 on):

    - 12 px (up to version 2): ~190 superpixels, 273/284 and 532/578 (the first two other sets)
    - 16 px (version 3): ~110 superpixels, ~7 CPU-ms less per image; 276/284, 539/578 and 551/588
    - 18 px (version 4): ~90 superpixels, ~0.4 CPU-ms less again; 277/284, 540/578 and 555/588 with two boundary
      refinement passes, 276/284, 543/578 and 556/588 with the one of version 4 (``REFINE_PASSES``); on the 14
      sample photos each has >= 2 regions, and 10 of the 19 hand-boxed objects are found (8 with two passes)
    """
    return grouping_boxes_many([(rgb, structure_map)], work_side=work_side, seed_step=seed_step)[0]


def grouping_boxes_many(
    images: Sequence[tuple[np.ndarray, np.ndarray | None]],
    *,
    work_side: int = 192,
    seed_step: int = SEED_STEP,
) -> list[Proposals]:
    """Return ``grouping_boxes`` of each ``(rgb, structure_map or None)``: the same proposals, with the merging
    rounds shared by all the images (at 8 images, about a third of the merging's CPU time per image)."""
    graphs, sizes = [], []
    for rgb, structure_map in images:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB image (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
        work = work_image(rgb, work_side)
        work_h, work_w = work.shape[:2]
        edges = None
        if structure_map is not None:
            # Area averaging keeps thin edges (as grey) that a nearest-pixel resize would drop.
            edges = cv2.resize(structure_map, (work_w, work_h), interpolation=cv2.INTER_AREA) > 0
        labels = superpixels(work, seed_step)
        n = int(labels.max()) + 1
        spaces = {"lab": cv2.COLOR_RGB2Lab, "hsv": cv2.COLOR_RGB2HSV_FULL}
        graphs.append(_Graph(
            hists=_colour_histograms([cv2.cvtColor(work, spaces[space]) for space, _ in STRATEGIES], labels, n),
            sizes=np.bincount(labels.reshape(-1), minlength=n).astype(np.float64), boxes=_label_boxes(labels, n),
            boundaries=_boundaries(labels, edges, n), total=float(work_w * work_h),
        ))
        sizes.append(((work_w, work_h), (rgb.shape[1], rgb.shape[0])))
    merged = _hierarchy(graphs, [w for _, w in STRATEGIES]) if graphs else []
    return [_proposals(boxes, scores, work_size, size) for (boxes, scores), (work_size, size) in zip(merged, sizes)]


def _proposals(boxes: np.ndarray, scores: np.ndarray, work_size: tuple[int, int], size: tuple[int, int]) -> Proposals:
    """Return the unique ``boxes`` (work pixels), each with its best score, in the input image's pixels."""
    (work_w, work_h), (width, height) = work_size, size
    # Unique boxes only (strategies find the same ones), keeping the best score of each.
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    # As np.unique(boxes, axis=0) (rows in lexicographic order), on one int64 key per box: ~15 times faster.
    key = ((boxes[:, 0] * (work_h + 1) + boxes[:, 1]) * (work_w + 1) + boxes[:, 2]) * (work_h + 1) + boxes[:, 3]
    _, first = np.unique(key, return_index=True)
    boxes, scores = boxes[first], scores[first]
    scaled = boxes.astype(np.float64) / np.array([work_w, work_h, work_w, work_h]) * [width, height, width, height]
    out = np.concatenate([np.floor(scaled[:, :2]), np.ceil(scaled[:, 2:])], axis=1).astype(np.int64)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    areas = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]) / float(width * height)
    return Proposals(boxes=out, scores=scores, area_fractions=areas.astype(np.float64))
