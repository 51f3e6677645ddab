"""Label synthesis (Sec. 5): sparse random walk, displacement refinement, instance map, labels.

The reference implementation builds the dense N x N transition matrix (N = h*w at stride 4) and
squares it eight times, which costs O(N^2) memory and O(N^3) time and forces a 512 px limit.
Here the transition matrix is a sparse CSR matrix with at most 69 non-zeros per row (radius 5)
and ``T^t x`` is computed as t sparse products: any image size, a small fraction of the work,
the same numbers (tests compare against the dense formula).

:func:`synthesize_labels` (with :func:`instance_map` and :func:`instances_from_segments`) is the
readable per-image reference. :func:`synthesize_labels_batch` is the same math for a batch on
the models' device: it reuses every helper (Eq. 10 refinement, Eq. 11 walk inputs, the walk,
``upsample_to_image``, ``labels_from_scores``), runs the refinement of all images at once, the
walk as one block-diagonal matrix built without host round trips, and connected components
with :func:`connected_components` (a torch implementation on GPUs, numbered exactly as scipy
numbers them). ``SynthesisConfig.max_groups`` / ``max_instances`` bound the memory per image.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from irnet_ray.affinity import boundary_to_affinity, pair_index, pair_valid_mask, shift
from irnet_ray.config import SynthesisConfig

# --------------------------------------------------------------------------------------------
# Random walk (Eq. 12-13)
# --------------------------------------------------------------------------------------------


def _as_tensor(name: str, value, dims: int) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point array, got dtype {value.dtype}")
    return value


def _check_walk_inputs(scores, boundary, radius, beta, steps) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _as_tensor("scores", scores, 3)
    boundary = _as_tensor("boundary", boundary, 2)
    if scores.shape[1:] != boundary.shape:
        raise ValueError(
            f"scores (K, h, w) and boundary (h, w) must share h, w; got {tuple(scores.shape)} "
            f"and {tuple(boundary.shape)}"
        )
    if boundary.numel() == 0:
        raise ValueError("boundary must not be empty")
    if not torch.isfinite(boundary).all() or boundary.min() < 0 or boundary.max() > 1:
        raise ValueError("boundary values must lie in [0, 1]")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not isinstance(radius, int) or radius < 2:
        raise ValueError(f"radius must be an integer >= 2, got {radius!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return scores, boundary


def transition_matrix(boundary: torch.Tensor, *, radius: int = 5, beta: float = 10.0) -> torch.Tensor:
    """Eq. 12 as a sparse CSR matrix: ``T = S^-1 A^beta``, rows normalised.

    ``A`` holds the affinities of Eq. 7 between pixels closer than ``radius`` (both directions,
    ones on the diagonal); neighbours outside the map do not exist (stored as explicit zeros:
    every row has the same 2P + 1 slots, so the matrix is built without a host round trip).
    """
    columns, values = _transition_rows(boundary, radius, beta)
    return _rows_to_csr(columns, values)


def _transition_rows(boundary: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row slots of T for every pixel: (n, 2P + 1) column indices and values (rows sum to 1).

    Slot order: the backward pairs (from the pixel at ``-offset``, which stores that pair's
    affinity), the diagonal, the forward pairs, i.e. ascending columns. Slots of neighbours
    outside the map hold value 0 and point at the pixel itself.
    """
    height, width = boundary.shape
    index = pair_index(radius)
    device = boundary.device
    valid = pair_valid_mask(index, height, width, device=device)
    forward = torch.where(valid, boundary_to_affinity(boundary.float(), index).pow(beta), 0.0)
    reversed_offsets = index.offsets[::-1]
    last = index.num_pairs - 1
    backward = torch.stack([shift(forward[last - k], -dy, -dx) for k, (dy, dx) in enumerate(reversed_offsets)])
    backward_valid = torch.stack(
        [shift(valid[last - k], -dy, -dx, fill=False) for k, (dy, dx) in enumerate(reversed_offsets)]
    )
    values = torch.cat([backward, torch.ones_like(forward[:1]), forward])  # (2P + 1, h, w)
    present = torch.cat([backward_valid, torch.ones_like(valid[:1]), valid])
    offsets = [(-dy, -dx) for dy, dx in reversed_offsets] + [(0, 0)] + list(index.offsets)
    flat_offset = to_device([dy * width + dx for dy, dx in offsets], device).view(-1, 1, 1)
    pixel = torch.arange(height * width, device=device).view(1, height, width)
    columns = torch.where(present, pixel + flat_offset, pixel)
    values = values / values.sum(dim=0, keepdim=True)  # S^-1: the diagonal keeps every sum >= 1
    return columns.flatten(1).T, values.flatten(1).T


def _rows_to_csr(columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    rows, slots = columns.shape
    crow = torch.arange(0, rows * slots + 1, slots, device=columns.device)
    with warnings.catch_warnings():
        # torch flags CSR as beta; products with it are what we need and are tested here.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(crow, columns.flatten(), values.flatten(), (rows, rows))


def _propagate(matrix: torch.Tensor, columns: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        columns = matrix @ columns
    return columns


def random_walk(scores, boundary, *, radius: int = 5, beta: float = 10.0, steps: int = 256):
    """Propagate score maps inside class boundaries (Eq. 12-13).

    ``scores``: (K, h, w) float tensor or array; ``boundary``: (h, w) in [0, 1]. Returns
    ``T^t vec(scores * (1 - boundary))`` as (K, h, w), of the input's type and device.
    """
    return random_walk_batch([scores], [boundary], radius=radius, beta=beta, steps=steps)[0]


def random_walk_batch(
    scores: Sequence, boundaries: Sequence, *, radius: int = 5, beta: float = 10.0, steps: int = 256
) -> list:
    """:func:`random_walk` for many images (any sizes, any K) in one block-diagonal sparse walk."""
    if len(scores) != len(boundaries):
        raise ValueError(f"got {len(scores)} score stacks but {len(boundaries)} boundary maps")
    if not scores:
        return []
    checked = [_check_walk_inputs(s, b, radius, beta, steps) for s, b in zip(scores, boundaries)]
    device = checked[0][1].device
    walked = _walk_batch([s.to(device) for s, _ in checked], [b.to(device) for _, b in checked], radius, beta, steps)
    results = []
    for (s, _), out, original in zip(checked, walked, scores):
        out = out.to(s.dtype)
        results.append(out.cpu().numpy() if isinstance(original, np.ndarray) else out.to(s.device))
    return results


def _walk_batch(
    scores: list[torch.Tensor], boundaries: list[torch.Tensor], radius: int, beta: float, steps: int
) -> list[torch.Tensor]:
    """The walks of a batch: one block-diagonal walk on an accelerator (one kernel per step for
    the whole batch); one walk per image on the CPU, where the block-diagonal product gains
    nothing and pads every image to the widest score stack (measured: the walk's share of
    batched CPU labeling at 512 px doubled, docs/benchmarks.md)."""
    if scores and scores[0].device.type == "cpu":
        return [_walk_block_diagonal([s], [b], radius, beta, steps)[0] for s, b in zip(scores, boundaries)]
    return _walk_block_diagonal(scores, boundaries, radius, beta, steps)


def _walk_block_diagonal(
    scores: list[torch.Tensor], boundaries: list[torch.Tensor], radius: int, beta: float, steps: int
) -> list[torch.Tensor]:
    """The walk of checked, same-device inputs as one block-diagonal matrix; fp32 (K, h, w) out.

    No host round trip: every image's rows have the same number of slots, so the block
    diagonal is the row-wise concatenation of the images' rows with shifted column indices.
    """
    all_columns, all_values, seeds, start = [], [], [], 0
    width = max(s.shape[0] for s in scores)
    for s, b in zip(scores, boundaries):
        columns, values = _transition_rows(b, radius, beta)
        all_columns.append(columns + start)
        all_values.append(values)
        start += b.numel()
        seeded = (s.float() * (1.0 - b.float())).flatten(1).T
        seeds.append(F.pad(seeded, (0, width - s.shape[0])))
    matrix = _rows_to_csr(torch.cat(all_columns), torch.cat(all_values))
    walked = _propagate(matrix, torch.cat(seeds), steps)
    results, start = [], 0
    for s, b in zip(scores, boundaries):
        n = b.numel()
        results.append(walked[start : start + n, : s.shape[0]].T.reshape(s.shape))
        start += n
    return results


# --------------------------------------------------------------------------------------------
# Displacement field -> class-agnostic instance map (Sec. 5.1, App. A.1)
# --------------------------------------------------------------------------------------------


def _check_displacement(displacement) -> torch.Tensor:
    displacement = _as_tensor("displacement", displacement, 3)
    if displacement.shape[0] != 2:
        raise ValueError(f"displacement must be (2, h, w) with (dy, dx) channels, got {tuple(displacement.shape)}")
    if displacement.shape[1] < 1 or displacement.shape[2] < 1:
        raise ValueError(f"displacement must not be empty, got {tuple(displacement.shape)}")
    if not torch.isfinite(displacement).all():
        raise ValueError("displacement must be finite")
    return displacement


def _sample(
    fields: torch.Tensor, y: torch.Tensor, x: torch.Tensor, last_row: torch.Tensor, last_col: torch.Tensor
) -> torch.Tensor:
    """Bilinear sample of (N, 2, h, w) fields at float pixel positions (N, h, w), each inside its
    own image ``[0, last_row] x [0, last_col]`` ((N, 1, 1) limits; the canvas may be larger).

    Written with gathers in pixel units, so an image gives the same numbers on any canvas.
    """
    count, channels, height, width = fields.shape
    y0, x0 = y.floor(), x.floor()
    wy, wx = (y - y0).unsqueeze(1), (x - x0).unsqueeze(1)
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).minimum(last_row), (x0 + 1).minimum(last_col)
    flat = fields.flatten(2)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        index = (rows * width + cols).flatten(1).unsqueeze(1).expand(-1, channels, -1)
        return flat.gather(2, index).view(count, channels, height, width)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _refined_centroids(
    fields: torch.Tensor, last_row: torch.Tensor, last_col: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 on (N, 2, h, w) fp32 fields: each pixel's centroid estimate (cy, cx), (N, h, w),
    kept inside its image (``last_row``/``last_col``: (N, 1, 1) long)."""
    _, _, height, width = fields.shape
    ys = torch.arange(height, dtype=torch.float32, device=fields.device).view(1, -1, 1)
    xs = torch.arange(width, dtype=torch.float32, device=fields.device).view(1, 1, -1)
    row_limit, col_limit = last_row.float(), last_col.float()
    cy = (ys + fields[:, 0]).clamp(min=0).minimum(row_limit)
    cx = (xs + fields[:, 1]).clamp(min=0).minimum(col_limit)
    for _ in range(iterations):
        step = _sample(fields, cy, cx, last_row, last_col)
        cy = (cy + step[:, 0]).clamp(min=0).minimum(row_limit)
        cx = (cx + step[:, 1]).clamp(min=0).minimum(col_limit)
    return cy, cx


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A small int64 table from the host: pinned and non-blocking on CUDA, so the device queue
    does not wait for it (a pageable copy makes the stream synchronise)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _image_limits(sizes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 1) last row and last column of each image, copied without a device sync."""
    limits = to_device([[h - 1, w - 1] for h, w in sizes], device)
    return limits[:, 0].view(-1, 1, 1), limits[:, 1].view(-1, 1, 1)


def _check_iterations(iterations) -> None:
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")


def refine_displacement(displacement, iterations: int = 100):
    """Eq. 10: ``D_{u+1}(x) = D_u(x) + D(x + D_u(x))`` with ``D_0 = D``.

    Each step adds the field sampled bilinearly at the current centroid estimate, which is
    kept inside the image. Returns the refined (2, h, w) field (same type as the input).
    """
    field = _check_displacement(displacement)
    _check_iterations(iterations)
    height, width = field.shape[1:]
    last_row, last_col = _image_limits([(height, width)], field.device)
    cy, cx = _refined_centroids(field.float()[None], last_row, last_col, iterations)
    ys = torch.arange(height, dtype=torch.float32, device=field.device).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32, device=field.device).view(1, -1)
    refined = torch.stack([cy[0] - ys, cx[0] - xs]).to(field.dtype)
    return refined.numpy() if isinstance(displacement, np.ndarray) else refined


def keep_largest(counts: torch.Tensor, present: torch.Tensor, limit: int) -> torch.Tensor:
    """Along the last dim: the ``limit`` entries of ``present`` with the largest ``counts``
    (ties: the lower index), as a bool mask; the cap rule of ``SynthesisConfig.max_groups``."""
    order = torch.sort(torch.where(present, counts, -1), dim=-1, descending=True, stable=True).indices
    positions = torch.arange(counts.shape[-1], device=counts.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return present & (rank < limit)


def keep_top_scores(scores: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices (ascending) of the ``limit`` highest ``scores`` (ties: the lower index); the cap
    rule of ``SynthesisConfig.max_instances``."""
    if limit is None or len(scores) <= limit:
        return np.arange(len(scores))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:limit])


def instance_map(
    displacement, *, iterations: int = 100, threshold: float = 2.5, max_groups: int | None = None
) -> np.ndarray:
    """Class-agnostic instance map I of Eq. 14-15 (the readable per-image reference).

    Candidate centroids are the pixels where the IRNet field is short (``||D|| < threshold``,
    stride-4 pixels); each 4-connected component of them is one centroid. Every pixel gets the
    component that its refined centroid estimate (Eq. 10) lands in. Returns an (h, w) int32 map
    with instances numbered 1..K and 0 where the estimate lands on no candidate. ``max_groups``
    keeps the groups with the most pixels (their pixels otherwise become 0).
    """
    field = _check_displacement(displacement)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    _check_iterations(iterations)
    field = field.detach().float().cpu()
    height, width = field.shape[1:]
    cy, cx = _refined_centroids(field[None], *_image_limits([(height, width)], field.device), iterations)
    field_np = field.numpy()
    candidates = np.hypot(field_np[0], field_np[1]) < threshold
    components, _ = scipy.ndimage.label(candidates)  # default structure: 4-connectivity
    assigned = components[np.rint(cy[0].numpy()).astype(np.int64), np.rint(cx[0].numpy()).astype(np.int64)]
    # Renumber the components that received pixels as 1..K.
    counts = np.bincount(assigned.ravel(), minlength=components.max() + 1)
    counts[0] = 0
    used = counts > 0
    if max_groups is not None:
        used = keep_largest(torch.from_numpy(counts), torch.from_numpy(used), max_groups).numpy()
    lookup = np.zeros(len(counts), dtype=np.int32)
    lookup[used] = np.arange(1, used.sum() + 1, dtype=np.int32)
    return lookup[assigned]


def connected_components(labels: torch.Tensor, *, method: str = "auto", check_every: int = 8) -> torch.Tensor:
    """4-connected components of equal non-zero values in (N, h, w) maps, on their device.

    Returns (N, h, w) int64 ids numbered 1..n per map in raster order of each component's first
    pixel, exactly as ``scipy.ndimage.label`` numbers a binary mask; 0 stays 0. ``method``:
    "scipy" (per map on the host), "torch" (on the device) or "auto" (scipy for CPU tensors,
    where its C loop is faster, torch otherwise). The torch version waits for the device once
    every ``check_every`` iterations (convergence test).
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, h, w), got {tuple(labels.shape)}")
    if method not in ("auto", "scipy", "torch"):
        raise ValueError(f"method must be auto, scipy or torch, got {method!r}")
    if method == "scipy" or (method == "auto" and labels.device.type == "cpu"):
        maps = [torch.from_numpy(_components_scipy(m.cpu().numpy())) for m in labels]
        return torch.stack(maps).to(labels.device) if maps else labels.long()
    return _components_torch(labels.long(), check_every)


def _components_scipy(labels: np.ndarray) -> np.ndarray:
    if labels.dtype == bool:
        return scipy.ndimage.label(labels)[0].astype(np.int64)
    combined = np.zeros(labels.shape, dtype=np.int64)
    count = 0
    for value in np.unique(labels[labels != 0]):
        components, found = scipy.ndimage.label(labels == value)
        combined[components > 0] = components[components > 0] + count
        count += found
    # Renumber all components in raster order of their first pixel.
    ids, first, inverse = np.unique(combined.ravel(), return_index=True, return_inverse=True)
    rank = np.zeros(len(ids), dtype=np.int64)
    nonzero = ids > 0
    rank[nonzero] = np.argsort(np.argsort(first[nonzero])) + 1
    return rank[inverse].reshape(labels.shape)


def _components_torch(labels: torch.Tensor, check_every: int) -> torch.Tensor:
    """Min-label propagation with pointer jumping: every pixel holds the raster index of a pixel
    of its component, never above its own; neighbours with equal labels take the smaller index
    and then jump to the index held there, until nothing changes (the component's first pixel)."""
    count, height, width = labels.shape
    size = height * width
    foreground = labels != 0
    own = torch.arange(size, device=labels.device).view(1, height, width).expand(count, -1, -1)
    parent = torch.where(foreground, own, size)
    down = foreground[:, 1:, :] & (labels[:, 1:, :] == labels[:, :-1, :])  # pixel joins the one above
    right = foreground[:, :, 1:] & (labels[:, :, 1:] == labels[:, :, :-1])
    for _ in range(size + 1):
        before = parent
        for _ in range(check_every):
            best = parent.clone()
            best[:, 1:, :] = torch.minimum(best[:, 1:, :], torch.where(down, parent[:, :-1, :], size))
            best[:, :-1, :] = torch.minimum(best[:, :-1, :], torch.where(down, parent[:, 1:, :], size))
            best[:, :, 1:] = torch.minimum(best[:, :, 1:], torch.where(right, parent[:, :, :-1], size))
            best[:, :, :-1] = torch.minimum(best[:, :, :-1], torch.where(right, parent[:, :, 1:], size))
            flat = best.flatten(1)
            jumped = flat.gather(1, flat.clamp(max=size - 1)).view_as(best)
            parent = torch.where(foreground, torch.minimum(best, jumped), size)
        if torch.equal(parent, before):  # the one device wait per check_every iterations
            break
    roots = foreground & (parent == own)
    rank = roots.flatten(1).cumsum(1)
    return torch.where(foreground, rank.gather(1, parent.flatten(1).clamp(max=size - 1)).view_as(parent), 0)


def _instance_maps(
    displacements: list[torch.Tensor], config: SynthesisConfig, method: str = "auto"
) -> list[torch.Tensor]:
    """:func:`instance_map` of many (2, h, w) fields at once, on their device, as (h, w) int64
    tensors (no host round trip but the convergence tests of :func:`connected_components`)."""
    device = displacements[0].device
    sizes = [tuple(d.shape[1:]) for d in displacements]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    fields = torch.zeros(len(sizes), 2, height, width, device=device)
    inside = torch.zeros(len(sizes), height, width, dtype=torch.bool, device=device)
    for n, (field, (h, w)) in enumerate(zip(displacements, sizes)):
        fields[n, :, :h, :w] = field
        inside[n, :h, :w] = True
    cy, cx = _refined_centroids(fields, *_image_limits(sizes, device), config.displacement_iterations)
    candidates = (torch.hypot(fields[:, 0], fields[:, 1]) < config.centroid_threshold) & inside
    components = connected_components(candidates, method=method).flatten(1)
    landing = (cy.round().long() * width + cx.round().long()).flatten(1)
    assigned = components.gather(1, landing) * inside.flatten(1)
    counts = torch.zeros(len(sizes), height * width + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, assigned, torch.ones_like(assigned))
    counts[:, 0] = 0
    used = keep_largest(counts, counts > 0, config.max_groups)
    groups = (used.cumsum(1) * used).gather(1, assigned).view(len(sizes), height, width)
    return [groups[n, :h, :w] for n, (h, w) in enumerate(sizes)]


# --------------------------------------------------------------------------------------------
# Pseudo labels (Sec. 5.2, Sec. 6.2)
# --------------------------------------------------------------------------------------------


@dataclass
class InstanceLabels:
    """Instances of one image at full resolution, ready for COCO-style export or AP."""

    masks: np.ndarray  # (P, H, W) bool
    classes: np.ndarray  # (P,) int64, 1-based
    scores: np.ndarray  # (P,) float32

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class SynthesizedLabels:
    semantic: np.ndarray  # (H, W) uint8 class ids, 0 = background
    instances: InstanceLabels
    instance_map: np.ndarray  # (h, w) class-agnostic instance map at stride 4


def upsample_to_image(maps: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Stride-4 maps (K, h, w) -> bilinear x4, cropped to the image (K, H, W)."""
    height, width = image_size
    up = F.interpolate(maps.unsqueeze(0), scale_factor=4, mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]


def divide_by_max(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their global max (at least 1e-5)."""
    return scores / scores.max().clamp(min=1e-5)


def labels_from_scores(scores: torch.Tensor, background: float) -> torch.Tensor:
    """Divide by the global max, prepend a constant background plane, argmax (0 = background)."""
    return F.pad(divide_by_max(scores), (0, 0, 0, 0, 1, 0), value=background).argmax(dim=0)


def instances_from_segments(
    scores: np.ndarray,
    segment_of_pixel: np.ndarray,
    segment_classes: np.ndarray,
    min_size: float,
    max_instances: int | None = None,
) -> InstanceLabels:
    """Split each segment (1..S in ``segment_of_pixel``) into 4-connected components.

    Each component is one instance scored by the max of its segment's score map inside it;
    components smaller than ``min_size`` pixels get score 0 (App. A.1 / reference). With
    ``max_instances`` only the highest-scoring ones stay (in their order).
    """
    masks, classes, values = [], [], []
    for segment, class_id in enumerate(segment_classes, start=1):
        region = segment_of_pixel == segment
        if not region.any():
            continue
        components, count = scipy.ndimage.label(region)
        for component in range(1, count + 1):
            mask = components == component
            score = float(scores[segment - 1][mask].max()) if mask.sum() >= min_size else 0.0
            masks.append(mask)
            classes.append(int(class_id))
            values.append(score)
    kept = keep_top_scores(np.asarray(values, dtype=np.float32), max_instances)
    masks, classes, values = [masks[k] for k in kept], [classes[k] for k in kept], [values[k] for k in kept]
    height, width = segment_of_pixel.shape
    return InstanceLabels(
        masks=np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool),
        classes=np.asarray(classes, dtype=np.int64),
        scores=np.asarray(values, dtype=np.float32),
    )


def _check_cams(cams, classes) -> tuple[torch.Tensor, torch.Tensor]:
    cams = _as_tensor("cams", cams, 3)
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if classes.numel() != cams.shape[0]:
        raise ValueError(f"got {cams.shape[0]} CAMs but {classes.numel()} class ids")
    if classes.numel() and classes.min() < 1:
        raise ValueError(f"class ids are 1-based, got {classes.tolist()}")
    return cams, classes


def synthesize_labels(
    cams,
    classes,
    boundary,
    displacement,
    image_size: tuple[int, int],
    config: SynthesisConfig = SynthesisConfig(),
) -> SynthesizedLabels:
    """Semantic and instance pseudo labels of one image from its stride-4 CAMs and IRNet outputs.

    ``cams`` (K, h, w) normalised CAMs of the image's classes ``classes`` (K,), ``boundary``
    (h, w), ``displacement`` (2, h, w) with the mean displacement already subtracted;
    ``image_size`` (H, W) with ``h = ceil(H / 4)``. One walk propagates the K class maps and the
    K x (instances + 1) instance-wise maps together, since they share the transition matrix.
    """
    cams, classes = _check_cams(cams, classes)
    boundary = _as_tensor("boundary", boundary, 2)
    displacement = _check_displacement(displacement)
    height, width = image_size
    expected = (-(-height // 4), -(-width // 4))
    if tuple(boundary.shape) != expected or tuple(displacement.shape[1:]) != expected:
        raise ValueError(
            f"boundary {tuple(boundary.shape)} and displacement {tuple(displacement.shape)} must be "
            f"at stride 4 of the image {image_size}, i.e. {expected}"
        )
    if tuple(cams.shape[1:]) != expected:
        raise ValueError(f"cams must be (K, {expected[0]}, {expected[1]}), got {tuple(cams.shape)}")
    num_classes = cams.shape[0]
    if num_classes == 0:
        return _empty_labels(height, width)

    instances = instance_map(
        displacement, iterations=config.displacement_iterations, threshold=config.centroid_threshold,
        max_groups=config.max_groups,
    )  # fmt: skip
    groups = torch.from_numpy(instances).long().to(cams.device)
    num_groups = int(groups.max()) + 1
    walked = random_walk(
        walk_inputs(cams, groups, num_groups), boundary.to(cams.dtype), radius=config.radius,
        beta=config.beta, steps=config.steps,
    )
    full = upsample_to_image(walked, image_size)
    semantic_scores, instance_scores = full[:num_classes], full[num_classes:]

    semantic = class_keys(classes.to(full.device))[labels_from_scores(semantic_scores, config.sem_background_threshold)]
    winner = labels_from_scores(instance_scores, config.ins_background_threshold)
    labels = instances_from_segments(
        divide_by_max(instance_scores).cpu().numpy(),
        winner.cpu().numpy(),
        np.repeat(classes.cpu().numpy(), num_groups),
        min_size=config.min_instance_fraction * height * width,
        max_instances=config.max_instances,
    )
    return SynthesizedLabels(semantic.cpu().numpy().astype(np.uint8), labels, instances)


def walk_inputs(cams: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The K class maps and the K x G instance-wise maps of Eq. 11, ``M_ck = M_c * [I == k]``,
    stacked for one walk (they share the transition matrix). Group 0 (pixels whose centroid
    lands on no candidate) keeps its CAM mass as its own group."""
    one_hot = (groups == torch.arange(num_groups, device=groups.device).view(-1, 1, 1)).to(cams.dtype)  # (G, h, w)
    instance_cams = (cams.unsqueeze(1) * one_hot.unsqueeze(0)).flatten(0, 1)  # (K*G, h, w)
    return torch.cat([cams, instance_cams])


def class_keys(classes: torch.Tensor) -> torch.Tensor:
    """Label of each argmax slot: 0 (background plane), then the class ids."""
    return F.pad(classes, (1, 0))


def _empty_labels(height: int, width: int) -> SynthesizedLabels:
    empty = InstanceLabels(np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.float32))
    strided = np.zeros((-(-height // 4), -(-width // 4)), np.int32)
    return SynthesizedLabels(np.zeros((height, width), np.uint8), empty, strided)


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthesize_labels_batch(
    cams: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor],
    boundaries: Sequence[torch.Tensor],
    displacements: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    config: SynthesisConfig = SynthesisConfig(),
    timings: dict[str, float] | None = None,
    components_method: str = "auto",
) -> list[SynthesizedLabels]:
    """:func:`synthesize_labels` of many images on their device (the same math, batched).

    Inputs as :func:`synthesize_labels`, one per image, already checked (model outputs on one
    device). Refinement and centroid groups run for all images at once, the walk is one
    block-diagonal walk, instance masks are the components of all winner maps in one
    :func:`connected_components` call. Host round trips per batch: the number of groups and
    the number of components (one wait each), then one copy of each image's results.
    ``timings`` gets ``"walk"`` and ``"instances"`` seconds added (device waited for).
    """
    results: list[SynthesizedLabels | None] = [None] * len(cams)
    active = [n for n, c in enumerate(classes) if len(c) > 0]
    for n in set(range(len(cams))) - set(active):
        results[n] = _empty_labels(*image_sizes[n])
    if not active:
        return results
    device = boundaries[active[0]].device
    timings = {} if timings is None else timings
    started = time.perf_counter()
    groups = _instance_maps([displacements[n].float() for n in active], config, components_method)
    num_groups = [g + 1 for g in torch.stack([g.max() for g in groups]).tolist()]  # host wait 1
    timings["instances"] = timings.get("instances", 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    walked = _walk_batch(
        [walk_inputs(cams[n].float(), g, k) for n, g, k in zip(active, groups, num_groups)],
        [boundaries[n].float() for n in active], config.radius, config.beta, config.steps,
    )  # fmt: skip
    _wait(device)
    timings["walk"] = timings.get("walk", 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    semantic, winners, normalised = [], [], []
    for n, scores in zip(active, walked):
        full = upsample_to_image(scores, image_sizes[n])
        k = len(classes[n])
        keys = class_keys(classes[n].to(device))
        semantic.append(keys[labels_from_scores(full[:k], config.sem_background_threshold)])
        winners.append(labels_from_scores(full[k:], config.ins_background_threshold))
        normalised.append(divide_by_max(full[k:]))
    height = max(w.shape[0] for w in winners)
    width = max(w.shape[1] for w in winners)
    canvas = torch.zeros(len(winners), height, width, dtype=torch.long, device=device)
    for m, winner in enumerate(winners):
        canvas[m, : winner.shape[0], : winner.shape[1]] = winner
    components = connected_components(canvas, method=components_method)
    counts = components.flatten(1).amax(1).tolist()  # host wait 2
    device_results = []
    for m, (n, winner, scores) in enumerate(zip(active, winners, normalised)):
        h, w = winner.shape
        ids = components[m, :h, :w].flatten()
        slots = counts[m] + 1
        segment = torch.zeros(slots, dtype=torch.long, device=device).scatter_(0, ids, winner.flatten())
        size = torch.zeros(slots, dtype=torch.long, device=device).scatter_add_(0, ids, torch.ones_like(ids))
        pixel_score = scores.flatten(1).gather(0, (winner.flatten() - 1).clamp(min=0)[None])[0]
        best = torch.full((slots,), -torch.inf, device=device).scatter_reduce_(0, ids, pixel_score, "amax")
        device_results.append(
            (semantic[m].to(torch.uint8), ids.view(h, w).int(), segment, size, best, groups[m].int())
        )  # fmt: skip
    host_results = _to_host(device_results)
    for n, k, (semantic_map, ids, segment, size, best, group_map) in zip(active, num_groups, host_results):
        h, w = image_sizes[n]
        results[n] = SynthesizedLabels(
            semantic_map,
            _instances_from_components(ids, segment, size, best, np.repeat(classes[n].cpu().numpy(), k),
                                       config.min_instance_fraction * h * w, config.max_instances),
            group_map,
        )  # fmt: skip
    timings["instances"] = timings.get("instances", 0.0) + time.perf_counter() - started
    return results


def _to_host(items: list[tuple[torch.Tensor, ...]]) -> list[tuple[np.ndarray, ...]]:
    """Each image's result tensors -> NumPy, with non-blocking copies and one wait on CUDA."""
    if not items or not items[0][0].is_cuda:
        return [tuple(t.numpy() for t in item) for item in items]
    copies = [tuple(t.to("cpu", non_blocking=True) for t in item) for item in items]
    torch.cuda.synchronize()
    return [tuple(t.numpy() for t in item) for item in copies]


def _instances_from_components(
    ids: np.ndarray, segment: np.ndarray, size: np.ndarray, best: np.ndarray, segment_classes: np.ndarray,
    min_size: float, max_instances: int | None,
) -> InstanceLabels:
    """:func:`instances_from_segments` from precomputed components (``ids`` numbered in raster
    order, the segment, pixel count and best score of each): instances in segment order, then
    raster order of their first pixel, as the reference enumerates them."""
    component = np.arange(1, len(segment))
    order = component[np.lexsort((component, segment[1:]))]
    scores = np.where(size[order] >= min_size, best[order], 0.0).astype(np.float32)
    kept = order[keep_top_scores(scores, max_instances)]
    lookup = np.zeros(len(segment), dtype=np.int32)
    lookup[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    instance = lookup[ids]
    masks = instance[None] == np.arange(1, len(kept) + 1, dtype=np.int32)[:, None, None]
    return InstanceLabels(
        masks=masks,
        classes=segment_classes[segment[kept] - 1].astype(np.int64),
        scores=np.where(size[kept] >= min_size, best[kept], 0.0).astype(np.float32),
    )


def cam_connected_components(
    cam_labels: np.ndarray, highres_cams: np.ndarray, classes: np.ndarray, min_fraction: float = 0.01
) -> InstanceLabels:
    """The "CAM + connected components" baseline: every component of a raw-CAM class mask is
    one instance, scored by its class's max CAM inside it."""
    classes = np.asarray(classes, dtype=np.int64)
    segment_of_pixel = np.zeros(cam_labels.shape, dtype=np.int64)
    for n, class_id in enumerate(classes, start=1):
        segment_of_pixel[cam_labels == class_id] = n
    return instances_from_segments(
        np.asarray(highres_cams), segment_of_pixel, classes, min_fraction * cam_labels.size
    )
