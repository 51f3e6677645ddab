"""Optimiser and the polynomial learning-rate decay shared by both training stages."""

from __future__ import annotations

import torch


def sgd_with_poly_decay(
    param_groups: list[dict], *, lr: float, momentum: float, weight_decay: float, total_steps: int, power: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD whose group learning rates decay as ``(1 - step / total_steps) ** power``.

    Each group carries an ``lr_scale`` relative to ``lr``. Momentum is the real momentum (the
    reference passes the weight decay into SGD's momentum slot).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    groups = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in param_groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total_steps) ** power
    )
    return optimizer, scheduler
