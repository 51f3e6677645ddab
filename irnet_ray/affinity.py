"""Pixel-pair indexing and boundary-derived affinities (Eq. 2 and Eq. 7).

One implementation serves IRNet training (pairs within radius 10, losses of Eq. 5, 6, 8) and
label synthesis (radius 5, the random walk of Eq. 12-13), so the two can never drift apart.

Pairs are enumerated as (pixel i, pixel j = i + offset) for the "forward" half of the disc
``0 < |offset| < radius`` (dy > 0, or dy == 0 and dx > 0); each unordered pair appears exactly once.
Maps of per-pair values therefore have shape (..., P, h, w): value of the pair that starts at
(y, x) and ends at (y + dy, x + dx).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairIndex:
    """The forward pair offsets of a radius and the pixels on the line of each pair."""

    radius: int
    offsets: tuple[tuple[int, int], ...]  # (dy, dx) of each forward pair, P of them
    # Pixels k of the line between i and j (Eq. 7), as offsets from i, endpoints included.
    paths: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_pairs(self) -> int:
        return len(self.offsets)

    def offsets_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(P, 2) float tensor of (dy, dx): the true displacement x_j - x_i of each pair."""
        return torch.tensor(self.offsets, dtype=torch.float32, device=device)


def _line_pixels(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    # Integer pixels within the segment's bounding box whose distance to the line through
    # (0, 0) and (dy, dx) is below one pixel (the reference's definition of Pi_ij). The set is
    # symmetric under k -> (dy, dx) - k, so a pair has the same path seen from either end.
    length_sq = dy * dy + dx * dx
    pixels = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 < length_sq:
                pixels.append((y, x))
    return tuple(pixels)


@functools.lru_cache(maxsize=None)
def pair_index(radius: int) -> PairIndex:
    """All forward pairs with ``0 < ||x_i - x_j|| < radius`` (Eq. 2)."""
    if not isinstance(radius, int) or radius < 2:
        raise ValueError(f"radius must be an integer >= 2, got {radius!r}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dy * dy + dx * dx < radius * radius
    ]
    return PairIndex(radius, tuple(offsets), tuple(_line_pixels(dy, dx) for dy, dx in offsets))


def shift(maps: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """``out[..., y, x] = maps[..., y + dy, x + dx]``; positions outside the map get ``fill``."""
    h, w = maps.shape[-2:]
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return maps
    padded = F.pad(maps, (pad, pad, pad, pad), value=fill)
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pair_valid_mask(index: PairIndex, height: int, width: int, device=None) -> torch.Tensor:
    """(P, h, w) bool: True where both ends of the pair lie inside the map."""
    ones = torch.ones(1, height, width, dtype=torch.bool, device=device)
    return torch.cat([shift(ones, dy, dx, fill=False) for dy, dx in index.offsets], dim=0)


def pair_values(maps: torch.Tensor, index: PairIndex, fill: float = 0.0) -> torch.Tensor:
    """Values at the far end j of every pair: (..., h, w) -> (..., P, h, w)."""
    return torch.stack([shift(maps, dy, dx, fill) for dy, dx in index.offsets], dim=-3)


def boundary_to_affinity(boundary: torch.Tensor, index: PairIndex) -> torch.Tensor:
    """Eq. 7: ``a_ij = 1 - max_{k on the line i..j} B(x_k)`` for every forward pair.

    ``boundary``: (..., h, w) in [0, 1]. Returns (..., P, h, w); entries of pairs that leave the
    map are meaningless and must be masked with :func:`pair_valid_mask`. Differentiable (the max
    passes its gradient to the strongest boundary pixel, the MIL view of Eq. 8).
    """
    # Each distinct pixel offset is shifted once and shared by all paths through it; paths of
    # equal length are then reduced together with one gather and one max.
    distinct, groups = _path_tables(index, boundary.device)
    shifted = torch.stack([shift(boundary, dy, dx) for dy, dx in distinct], dim=-3)
    height, width = boundary.shape[-2:]
    strongest = boundary.new_empty(*boundary.shape[:-2], index.num_pairs, height, width)
    for pairs, table in groups:
        gathered = shifted.index_select(-3, table.flatten())
        gathered = gathered.unflatten(-3, tuple(table.shape))  # (..., P_L, L, h, w)
        strongest[..., pairs, :, :] = gathered.amax(dim=-3)
    return 1.0 - strongest


@functools.lru_cache(maxsize=None)
def _path_tables(
    index: PairIndex, device: torch.device
) -> tuple[list[tuple[int, int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Distinct path offsets, and per path length: (pair ids, (P_L, L) slots into them), kept
    on ``device`` (a copy per call would make the device wait for the host each time)."""
    distinct = sorted({k for path in index.paths for k in path})
    slot = {k: n for n, k in enumerate(distinct)}
    by_length: dict[int, list[int]] = {}
    for pair, path in enumerate(index.paths):
        by_length.setdefault(len(path), []).append(pair)
    groups = [
        (
            torch.tensor(pairs, device=device),
            torch.tensor([[slot[k] for k in index.paths[p]] for p in pairs], device=device),
        )
        for _, pairs in sorted(by_length.items())
    ]
    return distinct, groups


@dataclass
class PairLabels:
    """Class-equivalence relations of Eq. 3-4 for every forward pair, each (N, P, h, w) bool."""

    fg_positive: torch.Tensor  # same foreground class (P+ fg)
    bg_positive: torch.Tensor  # both background (P+ bg)
    negative: torch.Tensor  # different labels (P-)


def pair_labels(label_map: torch.Tensor, index: PairIndex, ignore_index: int = 255) -> PairLabels:
    """Pairs of an IR label map (N, h, w) (0 background, 1..C class, ``ignore_index`` unsure).

    Pairs touching an ignored pixel or leaving the map belong to no set.
    """
    if label_map.dim() != 3:
        raise ValueError(f"label_map must be (N, h, w), got {tuple(label_map.shape)}")
    labels = label_map.long()
    far = pair_values(labels, index, fill=ignore_index)  # (N, P, h, w)
    near = labels.unsqueeze(1)
    known = (near != ignore_index) & (far != ignore_index)
    same = known & (near == far)
    return PairLabels(fg_positive=same & (near > 0), bg_positive=same & (near == 0), negative=known & (near != far))
