"""IRNet's losses: displacement (Eq. 5, 6), boundary via affinities (Eq. 8), total (Eq. 9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irnet_ray.affinity import PairIndex, PairLabels, boundary_to_affinity, pair_values

# Keeps log() finite where an affinity saturates at exactly 0 or 1 (as the reference does).
LOG_EPS = 1e-5


@dataclass
class IrnLosses:
    total: torch.Tensor  # Eq. 9 / 2 (the reference's scale)
    displacement_fg: torch.Tensor  # Eq. 5
    displacement_bg: torch.Tensor  # Eq. 6
    boundary: torch.Tensor  # Eq. 8
    boundary_fg: torch.Tensor  # its three normalised parts, for logging
    boundary_bg: torch.Tensor
    boundary_neg: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items()}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Each pair set is averaged over its own population (the sets are very imbalanced);
    # an empty set contributes zero.
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def displacement_losses(
    displacement: torch.Tensor, labels: PairLabels, index: PairIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 and 6 for a displacement field (N, 2, h, w) in stride-4 pixel units.

    ``delta(i, j) = D(x_i) - D(x_j)`` must equal ``x_j - x_i`` on foreground pairs (both point at
    one centroid) and vanish on background pairs. ``|.|`` is the L1 norm of the 2-vector.
    """
    far = pair_values(displacement, index)  # (N, 2, P, h, w)
    delta = displacement.unsqueeze(2) - far
    target = index.offsets_tensor(displacement.device).T.reshape(1, 2, -1, 1, 1)
    fg = _masked_mean((delta - target).abs().sum(dim=1), labels.fg_positive)
    bg = _masked_mean(delta.abs().sum(dim=1), labels.bg_positive)
    return fg, bg


def boundary_losses(
    boundary: torch.Tensor, labels: PairLabels, index: PairIndex
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of Eq. 8 (already divided by their populations, fg/bg weighted 1/2)."""
    affinity = boundary_to_affinity(boundary, index)  # (N, P, h, w)
    fg = _masked_mean(-torch.log(affinity + LOG_EPS), labels.fg_positive) / 2
    bg = _masked_mean(-torch.log(affinity + LOG_EPS), labels.bg_positive) / 2
    neg = _masked_mean(-torch.log(1.0 + LOG_EPS - affinity), labels.negative)
    return fg, bg, neg


def irnet_losses(
    boundary: torch.Tensor, displacement: torch.Tensor, labels: PairLabels, index: PairIndex
) -> IrnLosses:
    """Eq. 9, ``L = L_fg^D + L_bg^D + L^B``, halved as the reference trains it: it averages the
    two displacement terms and the positive and negative boundary terms, ``(L_fg^D + L_bg^D) / 2
    + (L_pos^B + L_neg^B) / 2``. The relative weights are Eq. 9's; the factor sets the step
    size the reference's learning rates were tuned with (:class:`~.config.IrnTrainConfig`)."""
    dp_fg, dp_bg = displacement_losses(displacement, labels, index)
    b_fg, b_bg, b_neg = boundary_losses(boundary, labels, index)
    boundary_total = b_fg + b_bg + b_neg
    return IrnLosses(
        total=(dp_fg + dp_bg) / 2 + boundary_total / 2,
        displacement_fg=dp_fg,
        displacement_bg=dp_bg,
        boundary=boundary_total,
        boundary_fg=b_fg,
        boundary_bg=b_bg,
        boundary_neg=b_neg,
    )
