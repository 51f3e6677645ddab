"""Deterministic synthetic benchmark for weakly supervised instance segmentation.

The dataset is designed so that the IRNet pipeline has something to fix:

* Every object has a **body** whose colour and texture come from one common
  distribution shared by all classes (mid-saturation colour, mild shading and
  noise) and whose outline is drawn from a shape pool that is, by default,
  independent of the class.  The body alone is therefore no evidence of a class.
* Inside each body sits a small class-specific **discriminative mark** (a disc
  covering roughly 15-30% of the object) with a class-specific colour and
  pattern (stripes of a given orientation, checker, dots, rings, ...).  A
  classifier trained on image-level labels learns the marks, so its class
  attention maps fire on the mark and miss most of the body; propagating them
  inside object boundaries recovers the whole object.
* With probability ``touching_probability`` two instances of the same class
  are placed touching or slightly overlapping (the later one on top), so
  instance separation is actually needed.
* The background is cluttered but lower-contrast than the objects: smooth
  colour gradients, low-frequency mottling, low-contrast blobs and distractor
  shapes that share the body colour distribution but carry no mark.

Every sample is generated from ``np.random.default_rng([seed, index])`` only,
so any index can be generated independently, in any order, on any worker.
Ground-truth semantic / instance masks (and the mark masks) are meant for
evaluation only; training must use ``SyntheticSample.classes`` alone.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence, overload

import numpy as np
from scipy import ndimage

__all__ = [
    "CLASS_NAMES",
    "SHAPE_NAMES",
    "SyntheticConfig",
    "SyntheticSample",
    "SyntheticDataset",
    "class_names",
    "generate_sample",
    "colorize_labels",
    "preview_grid",
]

#: Foreground class names, indexed by ``class_id - 1``.  Classes are defined by
#: the pattern (and colour) of their discriminative mark.
CLASS_NAMES: tuple[str, ...] = (
    "hstripes",
    "vstripes",
    "checker",
    "dots",
    "diagonal",
    "rings",
    "antidiagonal",
    "grid",
)

#: Object / distractor outlines.  Not class specific unless
#: ``SyntheticConfig.shape_class_correlation > 0``.
SHAPE_NAMES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
)

# Hue of each class's mark colour (first four maximally distinct).
_CLASS_HUES = (0.0, 0.33, 0.61, 0.15, 0.83, 0.5, 0.07, 0.73)

_REFERENCE_SIZE = 128.0  # size (px) at which the pixel knobs below are expressed
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


@dataclass(frozen=True)
class SyntheticConfig:
    """Configuration of the synthetic dataset.

    Pixel sizes (``object_size``) are given for a 128 px image and scaled by
    ``min(image_size) / 128``.
    """

    num_images: int = 256
    image_size: tuple[int, int] = (128, 128)
    num_classes: int = 4
    seed: int = 0
    min_instances: int = 1
    max_instances: int = 4
    max_classes_per_image: int = 3
    #: probability that an image contains a touching pair of same-class instances
    touching_probability: float = 0.35
    #: (min, max) object diameter in px at 128 px
    object_size: tuple[float, float] = (18.0, 50.0)
    #: (min, max) fraction of the object area covered by its mark
    mark_fraction: tuple[float, float] = (0.15, 0.28)
    #: every instance keeps at least this fraction of its area visible
    min_visible_fraction: float = 0.6
    #: every instance keeps at least this fraction of its mark visible
    min_visible_mark_fraction: float = 0.6
    #: (min, max) number of mark-less distractor shapes in the background
    num_distractors: tuple[int, int] = (1, 3)
    #: (min, max) number of low-contrast background blobs
    num_background_blobs: tuple[int, int] = (6, 14)
    #: probability that an object uses its class's canonical outline instead of a random one
    shape_class_correlation: float = 0.0
    #: std of the per-pixel Gaussian noise added to the final image (0-255 scale)
    noise_std: float = 5.0

    def __post_init__(self) -> None:
        # Normalise sequence-valued fields to tuples so the config stays hashable.
        for name in ("image_size", "object_size", "mark_fraction", "num_distractors", "num_background_blobs"):
            value = getattr(self, name)
            try:
                value = tuple(value)
            except TypeError:
                raise ValueError(f"SyntheticConfig.{name} must be a pair, got {value!r}") from None
            if len(value) != 2:
                raise ValueError(f"SyntheticConfig.{name} must be a pair, got {value!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        self.validate()

    def validate(self) -> None:
        if int(self.num_images) < 1:
            raise ValueError(f"SyntheticConfig.num_images must be >= 1, got {self.num_images}")
        height, width = self.image_size
        if height < 32 or width < 32:
            raise ValueError(f"SyntheticConfig.image_size must be at least 32 px on each side, got {self.image_size}")
        if not 1 <= int(self.num_classes) <= len(CLASS_NAMES):
            raise ValueError(
                f"SyntheticConfig.num_classes must be between 1 and {len(CLASS_NAMES)}, got {self.num_classes}"
            )
        if not 1 <= int(self.min_instances) <= int(self.max_instances):
            raise ValueError(
                "SyntheticConfig requires 1 <= min_instances <= max_instances, "
                f"got min_instances={self.min_instances}, max_instances={self.max_instances}"
            )
        if int(self.max_instances) > 16:
            raise ValueError(f"SyntheticConfig.max_instances must be <= 16, got {self.max_instances}")
        if int(self.max_classes_per_image) < 1:
            raise ValueError(f"SyntheticConfig.max_classes_per_image must be >= 1, got {self.max_classes_per_image}")
        for name in ("touching_probability", "shape_class_correlation"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1], got {value}")
        for name in ("min_visible_fraction", "min_visible_mark_fraction"):
            value = getattr(self, name)
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in (0, 1], got {value}")
        lo, hi = self.object_size
        if not 4.0 <= lo <= hi <= _REFERENCE_SIZE * 0.6:
            raise ValueError(
                f"SyntheticConfig.object_size must satisfy 4 <= min <= max <= {_REFERENCE_SIZE * 0.6:g}, "
                f"got {self.object_size}"
            )
        lo, hi = self.mark_fraction
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"SyntheticConfig.mark_fraction must satisfy 0 < min <= max < 1, got {self.mark_fraction}")
        for name in ("num_distractors", "num_background_blobs"):
            lo, hi = getattr(self, name)
            if not 0 <= int(lo) <= int(hi):
                raise ValueError(f"SyntheticConfig.{name} must satisfy 0 <= min <= max, got {getattr(self, name)}")
        if float(self.noise_std) < 0:
            raise ValueError(f"SyntheticConfig.noise_std must be >= 0, got {self.noise_std}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.num_classes)


@dataclass
class SyntheticSample:
    """One generated image with its (evaluation-only) ground truth."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    classes: np.ndarray  # sorted unique foreground class ids present, int64, in 1..C
    semantic: np.ndarray  # (H, W) uint8, 0 background, 1..C
    instances: np.ndarray  # (H, W) int32, 0 none, 1..K
    instance_classes: np.ndarray  # (K,) int64, class id of instance k+1
    #: (H, W) int32, id of the instance whose *visible* discriminative mark covers the pixel, else 0
    marks: np.ndarray | None = None

    @property
    def num_instances(self) -> int:
        return int(self.instance_classes.shape[0])

    def label_vector(self, num_classes: int) -> np.ndarray:
        """Multi-hot float32 vector of length ``num_classes`` (index ``c - 1`` for class ``c``)."""
        vec = np.zeros(num_classes, dtype=np.float32)
        vec[self.classes - 1] = 1.0
        return vec


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of foreground classes ``1..num_classes`` (background excluded)."""
    if not 1 <= int(num_classes) <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be between 1 and {len(CLASS_NAMES)}, got {num_classes}")
    return CLASS_NAMES[: int(num_classes)]


# --------------------------------------------------------------------------------------
# geometry helpers


@dataclass
class _Shape:
    """A rasterised shape in a tight local frame, positioned at (y0, x0) in the image."""

    kind: str
    mask: np.ndarray  # (h, w) bool, tight
    cy: float  # centre in local coordinates
    cx: float
    radius: float
    y0: int = 0
    x0: int = 0
    mark: np.ndarray | None = None  # (h, w) bool, subset of mask
    mark_cy: float = 0.0
    mark_cx: float = 0.0
    mark_radius: float = 0.0
    cls: int = 0
    area: int = 0
    mark_area: int = 0

    def place_centre(self, cy: float, cx: float) -> None:
        self.y0 = int(round(cy - self.cy))
        self.x0 = int(round(cx - self.cx))

    @property
    def centre(self) -> tuple[float, float]:
        return self.y0 + self.cy, self.x0 + self.cx

    def slices(self, pad: int = 0) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0 + pad, self.y0 + pad + h), slice(self.x0 + pad, self.x0 + pad + w)

    def inside(self, height: int, width: int) -> bool:
        h, w = self.mask.shape
        return self.y0 >= 0 and self.x0 >= 0 and self.y0 + h <= height and self.x0 + w <= width


def _polygon_mask(ys: np.ndarray, xs: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test; ``ys`` is (h, 1), ``xs`` is (1, w)."""
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_int = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_int)
    return inside


def _rasterize(kind: str, radius: float, rng: np.random.Generator) -> _Shape:
    angle = rng.uniform(0.0, 2.0 * math.pi)
    n = 2 * int(math.ceil(radius * 1.2)) + 3
    c = (n - 1) / 2.0 + rng.uniform(-0.5, 0.5)
    ys = (np.arange(n, dtype=np.float32) - c)[:, None]
    xs = (np.arange(n, dtype=np.float32) - c)[None, :]
    if kind == "circle":
        mask = ys * ys + xs * xs <= radius * radius
    elif kind == "ellipse":
        minor = radius * rng.uniform(0.6, 0.8)
        ca, sa = math.cos(angle), math.sin(angle)
        u = xs * ca + ys * sa
        v = -xs * sa + ys * ca
        mask = (u / radius) ** 2 + (v / minor) ** 2 <= 1.0
    else:
        if kind == "square":
            r = radius * 0.95
            t = angle + np.arange(4) * (math.pi / 2)
            verts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        elif kind == "triangle":
            r = min(radius * 1.15, (n - 3) / 2.0)
            t = angle + np.arange(3) * (2 * math.pi / 3)
            verts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        elif kind == "hexagon":
            t = angle + np.arange(6) * (math.pi / 3)
            verts = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
        elif kind == "star":
            r = min(radius * 1.1, (n - 3) / 2.0)
            t = angle + np.arange(10) * (math.pi / 5)
            rr = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.5, 0.6))
            verts = np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)
        elif kind == "diamond":
            t = angle + np.arange(4) * (math.pi / 2)
            rr = np.array([1.0, 0.65, 1.0, 0.65]) * radius
            verts = np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        mask = _polygon_mask(ys, xs, verts)
    # Sharp tips can leave pixels that touch the body only diagonally: keep the main 4-connected part.
    labels, n_comp = ndimage.label(mask, structure=_CROSS)
    if n_comp > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    shape = _Shape(kind=kind, mask=mask, cy=c - rows[0], cx=c - cols[0], radius=radius)
    shape.area = int(mask.sum())
    return shape


def _add_mark(shape: _Shape, fraction: float, rng: np.random.Generator) -> None:
    """Choose a disc covering ~``fraction`` of the shape, fully inside it where possible."""
    mask = shape.mask
    r = math.sqrt(fraction * shape.area / math.pi)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r_fit = min(r, 0.85 * float(dist.max()))
    cand = np.flatnonzero(dist.ravel() >= r_fit)
    pick = cand[rng.integers(len(cand))]
    my, mx = divmod(int(pick), mask.shape[1])
    my += rng.uniform(-0.5, 0.5)
    mx += rng.uniform(-0.5, 0.5)
    ys = np.arange(mask.shape[0], dtype=np.float32)[:, None] - my
    xs = np.arange(mask.shape[1], dtype=np.float32)[None, :] - mx
    mark = (ys * ys + xs * xs <= r * r) & mask
    shape.mark = mark
    shape.mark_cy, shape.mark_cx, shape.mark_radius = float(my), float(mx), float(r)
    shape.mark_area = int(mark.sum())


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 2) if n_in > 1 else np.zeros(n_out, np.int64)
    frac = pos - i0
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    m[rows, i0] = 1.0 - frac
    m[rows, i0 + 1] += frac
    m.flags.writeable = False
    return m


def _bilinear_sum(grids: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Sum of bilinear upsamplings of (gy, gx, C) grids, as a (height, width, C) float32 array."""
    out = None
    for grid in grids:
        my = _interp_matrix(height, grid.shape[0])
        mx = _interp_matrix(width, grid.shape[1])
        g = np.ascontiguousarray(grid.astype(np.float32).transpose(2, 0, 1))  # (C, gy, gx)
        up = my @ g @ mx.T  # (C, height, width)
        out = up if out is None else out + up
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    """Common (class-independent) body colour distribution: mid saturation and value."""
    return _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.88))


def _pick_colour(rng: np.random.Generator, refs: list[np.ndarray], min_dist: float, tries: int = 24) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(tries):
        col = _body_colour(rng)
        d = min((float(np.linalg.norm(col - r)) for r in refs), default=1e9)
        if d >= min_dist:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


def _mark_pattern(cls: int, h: int, w: int, cy: float, cx: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Binary class-specific pattern on a (h, w) local grid centred at (cy, cx)."""
    width = max(1.5, 2.0 * scale)  # stripe width in px
    period = 2.0 * width
    v = np.arange(h, dtype=np.float32)[:, None] - cy + rng.uniform(0, period)
    u = np.arange(w, dtype=np.float32)[None, :] - cx + rng.uniform(0, period)
    k = (cls - 1) % 8
    if k == 0:  # horizontal stripes
        pat = np.floor(v / width) % 2 == 0
        pat = np.broadcast_to(pat, (h, w))
    elif k == 1:  # vertical stripes
        pat = np.broadcast_to(np.floor(u / width) % 2 == 0, (h, w))
    elif k == 2:  # checker
        pat = (np.floor(u / width) + np.floor(v / width)) % 2 == 0
    elif k == 3:  # dots on a dark field
        pat = (np.mod(u, period) < width) & (np.mod(v, period) < width)
    elif k == 4:  # diagonal stripes
        pat = np.floor((u + v) / (width * 1.4142)) % 2 == 0
    elif k == 5:  # concentric rings around the mark centre
        dy = np.arange(h, dtype=np.float32)[:, None] - cy
        dx = np.arange(w, dtype=np.float32)[None, :] - cx
        rr = np.sqrt(dy * dy + dx * dx)
        pat = np.floor(rr / width) % 2 == 0
    elif k == 6:  # anti-diagonal stripes
        pat = np.floor((u - v) / (width * 1.4142)) % 2 == 0
    else:  # thin grid lines on a bright field
        pat = ~((np.mod(u, period + 1) < 1.0) | (np.mod(v, period + 1) < 1.0))
    return np.asarray(pat)


# --------------------------------------------------------------------------------------
# layout


class _Layout:
    """Visible-instance bookkeeping: later instances occlude earlier ones."""

    def __init__(self, height: int, width: int, min_vis: float, min_mark_vis: float) -> None:
        self.height, self.width = height, width
        self.min_vis, self.min_mark_vis = min_vis, min_mark_vis
        self.owner = np.zeros((height, width), dtype=np.int32)
        self.mark_owner = np.zeros((height, width), dtype=np.int32)
        self.objects: list[_Shape] = []
        self.visible: list[int] = []
        self.mark_visible: list[int] = []

    def try_add(self, obj: _Shape, forbidden: np.ndarray | None = None) -> bool:
        if not obj.inside(self.height, self.width):
            return False
        sl = obj.slices()
        if forbidden is not None and np.any(forbidden[sl] & obj.mask):
            return False
        under = self.owner[sl][obj.mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        under_mark = self.mark_owner[sl][obj.mask]
        mids, mcounts = np.unique(under_mark[under_mark > 0], return_counts=True)
        mark_lost = dict(zip(mids.tolist(), mcounts.tolist()))
        for i, lost in zip(ids.tolist(), counts.tolist()):
            prev = self.objects[i - 1]
            if self.visible[i - 1] - lost < self.min_vis * prev.area:
                return False
            if self.mark_visible[i - 1] - mark_lost.get(i, 0) < self.min_mark_vis * prev.mark_area:
                return False
            vis = self.owner == i
            vis[sl][obj.mask] = False
            _, n_comp = ndimage.label(vis[prev.slices()], structure=_CROSS)
            if n_comp != 1:
                return False
        new_id = len(self.objects) + 1
        self.owner[sl][obj.mask] = new_id
        self.mark_owner[sl][obj.mask] = 0
        self.mark_owner[sl][obj.mark] = new_id
        for i, lost in zip(ids.tolist(), counts.tolist()):
            self.visible[i - 1] -= lost
            self.mark_visible[i - 1] -= mark_lost.get(i, 0)
        self.objects.append(obj)
        self.visible.append(obj.area)
        self.mark_visible.append(obj.mark_area)
        return True

    def union(self, ids: Sequence[int] | None = None) -> np.ndarray:
        if ids is None:
            return self.owner > 0
        return np.isin(self.owner, np.asarray(list(ids), dtype=np.int32))


class _Generator:
    def __init__(self, config: SyntheticConfig, index: int) -> None:
        self.cfg = config
        self.rng = np.random.default_rng([int(config.seed), int(index)])
        self.height, self.width = config.image_size
        self.scale = min(self.height, self.width) / _REFERENCE_SIZE
        lo, hi = config.object_size
        self.size_lo, self.size_hi = lo * self.scale, hi * self.scale

    # -- objects -------------------------------------------------------------------
    def make_object(self, cls: int, size_hi: float | None = None) -> _Shape:
        rng, cfg = self.rng, self.cfg
        if cfg.shape_class_correlation > 0 and rng.random() < cfg.shape_class_correlation:
            kind = SHAPE_NAMES[(cls - 1) % len(SHAPE_NAMES)]
        else:
            kind = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        hi = self.size_hi if size_hi is None else max(self.size_lo, min(size_hi, self.size_hi))
        diameter = rng.uniform(self.size_lo, hi)
        shape = _rasterize(kind, diameter / 2.0, rng)
        _add_mark(shape, rng.uniform(*cfg.mark_fraction), rng)
        shape.cls = cls
        return shape

    def random_position(self, obj: _Shape) -> None:
        h, w = obj.mask.shape
        obj.y0 = int(self.rng.integers(0, max(1, self.height - h + 1)))
        obj.x0 = int(self.rng.integers(0, max(1, self.width - w + 1)))

    def place_free(self, layout: _Layout, cls: int, attempts: int = 32) -> bool:
        """Place an instance anywhere, keeping a gap to same-class instances."""
        same = [i + 1 for i, o in enumerate(layout.objects) if o.cls == cls]
        forbidden = None
        if same:
            forbidden = ndimage.binary_dilation(layout.union(same), structure=_CROSS, iterations=3)
        obj = None
        for attempt in range(attempts):
            if attempt % 4 == 0:  # new shape every few positions; smaller ones later on
                size_hi = self.size_hi if attempt < attempts // 2 else (self.size_lo + self.size_hi) / 2
                obj = self.make_object(cls, size_hi)
            self.random_position(obj)
            if layout.try_add(obj, forbidden):
                return True
        return False

    def place_touching(self, layout: _Layout, anchor_id: int, attempts: int = 12) -> bool:
        """Place a same-class instance touching / slightly overlapping instance ``anchor_id``."""
        anchor = layout.objects[anchor_id - 1]
        pad = int(math.ceil(self.size_hi * 2.0)) + 8
        contact = np.pad(
            ndimage.binary_dilation(layout.owner == anchor_id, structure=_CROSS), pad
        )
        ay, ax = anchor.centre
        for _ in range(attempts):
            obj = self.make_object(anchor.cls)
            theta = self.rng.uniform(0.0, 2.0 * math.pi)
            dy, dx = math.sin(theta), math.cos(theta)
            d = anchor.radius * 1.2 + obj.radius * 1.2 + 2.0
            touched = False
            while d > 0:
                obj.place_centre(ay + d * dy, ax + d * dx)
                if np.any(contact[obj.slices(pad)] & obj.mask):
                    touched = True
                    break
                d -= 1.0
            if not touched:
                continue
            overlap = self.rng.integers(0, max(1, int(0.12 * 2 * min(obj.radius, anchor.radius))) + 1)
            obj.place_centre(ay + (d - overlap) * dy, ax + (d - overlap) * dx)
            if layout.try_add(obj):
                return True
        return False

    # -- rendering -----------------------------------------------------------------
    def background(self) -> np.ndarray:
        rng, h, w, s = self.rng, self.height, self.width, self.scale
        base_h = rng.uniform(0.0, 1.0)
        corners = np.stack(
            [
                _hsv(base_h + rng.normal(0, 0.08), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.75))
                for _ in range(4)
            ]
        ).reshape(2, 2, 3)
        canvas = _bilinear_sum(
            [corners, rng.normal(0.0, 10.0, size=(5, 5, 3)), rng.normal(0.0, 5.0, size=(12, 12, 3))], h, w
        )
        n_blobs = int(rng.integers(self.cfg.num_background_blobs[0], self.cfg.num_background_blobs[1] + 1))
        for _ in range(n_blobs):
            ry = rng.uniform(5, 22) * s
            rx = ry * rng.uniform(0.5, 1.5)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
            x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
            xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
            m = yy * yy + xx * xx <= 1.0
            delta = rng.normal(0.0, 9.0, size=3) + rng.normal(0.0, 9.0)
            canvas[y0:y1, x0:x1][m] += delta.astype(np.float32)
        return canvas

    def paint_body(self, canvas: np.ndarray, obj: _Shape, colour: np.ndarray) -> None:
        h, w = obj.mask.shape
        gy, gx = self.rng.uniform(-0.12, 0.12, size=2)
        shade = (
            1.0
            + gy * (np.arange(h, dtype=np.float32)[:, None] - obj.cy) / max(obj.radius, 1.0)
            + gx * (np.arange(w, dtype=np.float32)[None, :] - obj.cx) / max(obj.radius, 1.0)
        )
        body = shade[..., None] * colour[None, None, :]
        canvas[obj.slices()][obj.mask] = body[obj.mask]

    def paint_mark(self, canvas: np.ndarray, obj: _Shape) -> None:
        rng = self.rng
        h, w = obj.mask.shape
        hue = _CLASS_HUES[(obj.cls - 1) % len(_CLASS_HUES)] + rng.normal(0, 0.012)
        bright = _hsv(hue, rng.uniform(0.85, 1.0), rng.uniform(0.88, 1.0))
        dark = _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.08, 0.2))
        pat = _mark_pattern(obj.cls, h, w, obj.mark_cy, obj.mark_cx, self.scale, rng)
        local = np.where(pat[..., None], bright[None, None, :], dark[None, None, :])
        canvas[obj.slices()][obj.mark] = local[obj.mark]

    def ring_refs(self, canvas: np.ndarray, painted: np.ndarray, obj: _Shape, colours: list[np.ndarray]) -> list:
        """Reference colours around ``obj``: background near it + earlier objects it may touch."""
        r = 2
        h, w = obj.mask.shape
        y0, x0 = max(0, obj.y0 - r), max(0, obj.x0 - r)
        y1, x1 = min(self.height, obj.y0 + h + r), min(self.width, obj.x0 + w + r)
        owners = painted[y0:y1, x0:x1]
        outside = np.ones(owners.shape, dtype=bool)
        outside[obj.y0 - y0 : obj.y0 - y0 + h, obj.x0 - x0 : obj.x0 - x0 + w] = ~obj.mask
        refs = []
        bg = outside & (owners == 0)
        if bg.any():
            refs.append(canvas[y0:y1, x0:x1][bg].mean(axis=0))
        for k in np.unique(owners):
            if k > 0:
                refs.append(colours[k - 1])
        return refs

    # -- driver --------------------------------------------------------------------
    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cfg, rng = self.cfg, self.rng
        touching = cfg.max_instances >= 2 and rng.random() < cfg.touching_probability
        lo = max(cfg.min_instances, 2 if touching else 1)
        n_inst = int(rng.integers(lo, cfg.max_instances + 1))
        max_cls = min(cfg.max_classes_per_image, cfg.num_classes, n_inst - (1 if touching else 0))
        n_cls_img = int(rng.integers(1, max_cls + 1))
        img_classes = (rng.choice(cfg.num_classes, size=n_cls_img, replace=False) + 1).tolist()
        extra = rng.choice(img_classes, size=n_inst - n_cls_img - (1 if touching else 0)).tolist()
        plan = ([img_classes[0]] if touching else []) + img_classes + extra
        # The touching pair (if any) is planned first; the rest in random order.
        rest = plan[2:] if touching else plan
        rest = [rest[i] for i in rng.permutation(len(rest))]

        layout = _Layout(self.height, self.width, cfg.min_visible_fraction, cfg.min_visible_mark_fraction)
        if touching:
            pair_cls = plan[0]
            if self.place_free(layout, pair_cls):
                if not self.place_touching(layout, len(layout.objects)):
                    self.place_free(layout, pair_cls)
        for cls in rest:
            self.place_free(layout, cls)
        for _ in range(100):  # an empty layout accepts any in-bounds placement, so this ends at once
            if layout.objects:
                break
            self.place_free(layout, plan[0])

        # Distractors: mark-less shapes with body colours, away from the objects.
        n_dis = int(rng.integers(cfg.num_distractors[0], cfg.num_distractors[1] + 1))
        keep_out = ndimage.binary_dilation(layout.owner > 0, structure=_CROSS, iterations=3)
        distractors = []
        for _ in range(n_dis):
            for _attempt in range(10):
                kind = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
                d = _rasterize(kind, rng.uniform(self.size_lo * 0.8, self.size_hi * 0.8) / 2.0, rng)
                self.random_position(d)
                if d.inside(self.height, self.width) and not np.any(keep_out[d.slices()] & d.mask):
                    keep_out[d.slices()] |= d.mask
                    distractors.append(d)
                    break

        canvas = self.background()
        painted = np.zeros((self.height, self.width), dtype=np.int32)
        for d in distractors:
            refs = self.ring_refs(canvas, painted, d, [])
            self.paint_body(canvas, d, _pick_colour(rng, refs, 55.0))
        colours: list[np.ndarray] = []
        for k, obj in enumerate(layout.objects, start=1):
            refs = self.ring_refs(canvas, painted, obj, colours)
            colour = _pick_colour(rng, refs, 60.0)
            colours.append(colour)
            self.paint_body(canvas, obj, colour)
            self.paint_mark(canvas, obj)
            painted[obj.slices()][obj.mask] = k
        if cfg.noise_std > 0:
            noise = rng.standard_normal(size=canvas.shape, dtype=np.float32)
            noise *= np.float32(cfg.noise_std)
            canvas += noise
        canvas += np.float32(0.5)
        np.clip(canvas, 0.0, 255.0, out=canvas)
        image = canvas.astype(np.uint8)
        inst_classes = np.array([o.cls for o in layout.objects], dtype=np.int64)
        return image, layout.owner, layout.mark_owner, inst_classes


def generate_sample(config: SyntheticConfig, index: int) -> SyntheticSample:
    """Generate sample ``index``; depends only on ``config`` and ``index`` (not on other samples)."""
    index = int(index)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    image, instances, marks, inst_classes = _Generator(config, index).run()
    lut = np.concatenate([[0], inst_classes]).astype(np.uint8)
    semantic = lut[instances]
    classes = np.unique(inst_classes).astype(np.int64)
    return SyntheticSample(
        image_id=f"synthetic-{config.seed}-{index:06d}",
        image=image,
        classes=classes,
        semantic=semantic,
        instances=instances,
        instance_classes=inst_classes,
        marks=marks,
    )


class SyntheticDataset(Sequence[SyntheticSample]):
    """Lazily generated, deterministic sequence of :class:`SyntheticSample`."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config if config is not None else SyntheticConfig()
        self.config.validate()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.config.num_classes)

    def __len__(self) -> int:
        return int(self.config.num_images)

    @overload
    def __getitem__(self, index: int) -> SyntheticSample: ...

    @overload
    def __getitem__(self, index: slice) -> list[SyntheticSample]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        try:
            i = int(index)
        except TypeError:
            raise TypeError(
                f"SyntheticDataset indices must be integers or slices, not {type(index).__name__}"
            ) from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"SyntheticDataset index {index} out of range for {n} images")
        return generate_sample(self.config, i)

    def __iter__(self) -> Iterator[SyntheticSample]:
        for i in range(len(self)):
            yield generate_sample(self.config, i)


# --------------------------------------------------------------------------------------
# visualisation helpers (no Pillow dependency: return arrays)


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """Map an integer label map to a deterministic RGB uint8 image (0 -> black)."""
    labels = np.asarray(labels).astype(np.int64)
    n = int(labels.max()) + 1 if labels.size else 1
    base = np.array(
        [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48],
         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
        dtype=np.uint8,
    )
    palette = np.zeros((max(n, 1), 3), dtype=np.uint8)
    if n > 1:
        palette[1:] = base[np.arange(n - 1) % len(base)]
    return palette[np.clip(labels, 0, None)]


def preview_grid(samples: Sequence[SyntheticSample], columns: int = 2, gap: int = 4) -> np.ndarray:
    """Tile ``image | semantic | instances | marks`` for each sample into one RGB uint8 array."""
    tiles = []
    for s in samples:
        marks = s.marks if s.marks is not None else np.zeros_like(s.instances)
        row = [s.image, colorize_labels(s.semantic), colorize_labels(s.instances), colorize_labels(marks)]
        h = s.image.shape[0]
        sep = np.full((h, gap, 3), 255, np.uint8)
        tiles.append(np.concatenate(sum(([t, sep] for t in row), [])[:-1], axis=1))
    if not tiles:
        return np.zeros((1, 1, 3), np.uint8)
    th, tw = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * (th + gap * 2), columns * (tw + gap * 3), 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = r * (th + gap * 2), c * (tw + gap * 3)
        grid[y : y + t.shape[0], x : x + t.shape[1]] = t
    return grid
