"""CAM network training (multi-label soft margin on image-level labels)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from irnet_ray.config import CamTrainConfig
from irnet_ray.models.cam import CamNet, normalize_images
from irnet_ray.train.schedule import sgd_with_poly_decay


def cam_optimizer(model: CamNet, config: CamTrainConfig, total_steps: int):
    groups = [
        {"params": model.backbone_parameters(), "lr_scale": config.backbone_lr_scale},
        {"params": model.head_parameters(), "lr_scale": 1.0},
    ]
    return sgd_with_poly_decay(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        total_steps=total_steps, power=config.poly_power,
    )


def cam_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``images`` uint8 (N, 3, H, W), ``targets`` multi-hot float (N, C)."""
    return F.multilabel_soft_margin_loss(model(normalize_images(images)), targets)


def train_cam(
    model: CamNet,
    epochs: Iterable[Iterable[dict]],
    config: CamTrainConfig,
    total_steps: int,
    device: torch.device,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train for one pass over each element of ``epochs`` (an iterable of batch iterables).

    Batches are dicts with ``image`` (uint8 N,3,H,W) and ``labels`` (multi-hot N,C). Returns the
    per-epoch metrics (mean loss, last learning rate, images/s).
    """
    model.to(device).train()
    optimizer, scheduler = cam_optimizer(model, config, total_steps)
    history = []
    for epoch, batches in enumerate(epochs):
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in batches:
            loss = cam_loss(model, batch["image"].to(device), batch["labels"].to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            steps += 1
            seen += len(batch["image"])
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(steps, 1),
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_second": seen / max(time.perf_counter() - started, 1e-9),
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history
