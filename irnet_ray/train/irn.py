"""IRNet training on IR label maps (Eq. 9) and the mean-displacement correction."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from irnet_ray.affinity import pair_index, pair_labels
from irnet_ray.config import IrnTrainConfig, RelationConfig
from irnet_ray.losses import irnet_losses
from irnet_ray.models.backbone import Backbone
from irnet_ray.models.cam import normalize_images
from irnet_ray.models.irnet import IRNet
from irnet_ray.train.schedule import sgd_with_poly_decay


def irn_optimizer(model: IRNet, config: IrnTrainConfig, total_steps: int):
    groups = [
        {"params": model.boundary_parameters(), "lr_scale": 1.0},
        {"params": model.displacement_parameters(), "lr_scale": config.displacement_lr_scale},
    ]
    return sgd_with_poly_decay(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        total_steps=total_steps, power=config.poly_power,
    )


def irn_step_losses(backbone: Backbone, model: IRNet, images: torch.Tensor, labels: torch.Tensor, radius: int):
    """Losses of one batch: ``images`` uint8 (N,3,S,S), ``labels`` IR labels at stride 4 (N,S/4,S/4)."""
    with torch.no_grad():
        features = backbone(normalize_images(images))
    output = model(features, subtract_mean=False)
    return irnet_losses(output.boundary, output.displacement, pair_labels(labels, pair_index(radius)), pair_index(radius))


def train_irn(
    backbone: Backbone,
    model: IRNet,
    epochs: Iterable[Iterable[dict]],
    config: IrnTrainConfig,
    relation_config: RelationConfig,
    total_steps: int,
    device: torch.device,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train the two branches on a frozen backbone. Batches: ``image`` and ``labels`` (stride 4)."""
    backbone.to(device).eval().requires_grad_(False)
    model.to(device).train()
    optimizer, scheduler = irn_optimizer(model, config, total_steps)
    history = []
    for epoch, batches in enumerate(epochs):
        started, seen, sums, steps = time.perf_counter(), 0, {}, 0
        for batch in batches:
            losses = irn_step_losses(
                backbone, model, batch["image"].to(device), batch["labels"].to(device), relation_config.radius
            )
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            scheduler.step()
            for name, value in losses.as_floats().items():
                sums[name] = sums.get(name, 0.0) + value
            steps += 1
            seen += len(batch["image"])
        metrics = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}}
        metrics["loss"] = metrics.pop("total", float("nan"))
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["images_per_second"] = seen / max(time.perf_counter() - started, 1e-9)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history


@torch.no_grad()
def mean_displacement(backbone: Backbone, model: IRNet, images: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean of the raw displacement field over a set of images (Sec. 4.2), shape (2,)."""
    backbone.to(device).eval()
    model.to(device).eval()
    total, count = torch.zeros(2, device=device), 0
    for batch in images:
        output = model(backbone(normalize_images(batch.to(device))), subtract_mean=False)
        total += output.displacement.mean(dim=(2, 3)).sum(dim=0)
        count += len(batch)
    if count == 0:
        raise ValueError("mean displacement needs at least one image")
    return total / count
