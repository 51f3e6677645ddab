"""The whole method on the built-in synthetic set, in one process: the `irnet-ray demo` command.

Train CAM -> CAM inference -> relation mining (CRF) -> train IRNet -> mean displacement ->
semantic + instance synthesis -> evaluation against the held-back ground truth.
Training sees image-level labels only; masks are read for evaluation alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from irnet_ray.config import (
    BackboneConfig,
    CamInferenceConfig,
    CamTrainConfig,
    IrnTrainConfig,
    RelationConfig,
    SynthesisConfig,
    config_to_dict,
)
from irnet_ray.data.synthetic import SyntheticConfig, SyntheticDataset, class_names
from irnet_ray.data.transforms import augment, to_chw_tensor
from irnet_ray.evaluation import InstanceEvaluator, SemanticEvaluator
from irnet_ray.models.cam import CamNet, cam_semantic_labels, multiscale_cams, normalize_images
from irnet_ray.models.irnet import IRNet
from irnet_ray.relations import downsample_labels, ir_label_map
from irnet_ray.synthesis import cam_connected_components, synthesize_labels
from irnet_ray.train.cam import train_cam
from irnet_ray.train.irn import mean_displacement, train_irn


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sized so the whole run fits in 15 minutes on 2 CPU cores without a GPU.

    Departures from the method defaults, all forced by training from scratch on a small CPU
    budget (every one is a flag of `irnet-ray demo`):
    - ResNet-18, BatchNorm trained with batch statistics and every stage trainable: there are
      no pretrained weights to freeze.
    - CAM training at half resolution (long side 112-144 of the 256 px images, 128 px crops)
      with one learning rate of 0.03 for head and backbone; CAMs are then inferred at full
      resolution (scale 1.0 of the 256 px image, i.e. twice the training scale), which gives
      the stride-16 CAM the spatial detail that VOC-sized images have.
    - The displacement branch keeps the base learning rate (x1 instead of x10): on features of
      a from-scratch backbone, x10 made the field drift (mean displacement of hundreds of px).
    - IRNet trains on 128 px crops for 8 epochs (the reference: 512 px crops, 3 epochs of 10k
      images).
    """

    data: SyntheticConfig = SyntheticConfig(num_images=384, image_size=(256, 256), num_classes=4, seed=0)
    backbone: BackboneConfig = BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0)
    cam_train: CamTrainConfig = CamTrainConfig(
        epochs=16, batch_size=16, lr=0.03, backbone_lr_scale=1.0, crop_size=128, rescale_long_side=(112, 144)
    )
    cam_inference: CamInferenceConfig = CamInferenceConfig(scales=(1.0,))
    relations: RelationConfig = RelationConfig()
    irn_train: IrnTrainConfig = IrnTrainConfig(
        epochs=8, batch_size=16, crop_size=128, rescale=(0.9, 1.1), displacement_lr_scale=1.0
    )
    synthesis: SynthesisConfig = SynthesisConfig()
    device: str = "auto"
    threads: int = 0  # 0: torch's default


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _multi_hot(classes: np.ndarray, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[torch.as_tensor(classes, dtype=torch.long) - 1] = 1.0
    return target


def _epochs(num_epochs: int, make_batches: Callable[[int], list[dict]]):
    for epoch in range(num_epochs):
        yield make_batches(epoch)


def _batched(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def run_demo(config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.cam_train.seed)
    device = resolve_device(config.device)
    dataset = SyntheticDataset(config.data)
    samples = [dataset[i] for i in range(len(dataset))]
    num_classes = config.data.num_classes
    timings: dict[str, float] = {}
    log(f"built-in set: {len(samples)} images {config.data.image_size}, classes {class_names(num_classes)}; device {device}")

    # 1. CAM network on image-level labels only.
    t = time.perf_counter()
    cam_model = CamNet(config.backbone, num_classes)
    images = [to_chw_tensor(s.image) for s in samples]
    targets = [_multi_hot(s.classes, num_classes) for s in samples]

    def cam_batches(epoch: int) -> list[dict]:
        rng = np.random.default_rng([config.cam_train.seed, epoch])
        order = rng.permutation(len(samples))
        batches = []
        for chunk in _batched(list(order), config.cam_train.batch_size):
            crops = [
                augment(images[i], None, rng, crop_size=config.cam_train.crop_size,
                        long_side_range=config.cam_train.rescale_long_side, hflip=config.cam_train.hflip)[0]
                for i in chunk
            ]
            batches.append({"image": torch.stack(crops), "labels": torch.stack([targets[i] for i in chunk])})
        return batches

    steps_per_epoch = -(-len(samples) // config.cam_train.batch_size)
    train_cam(
        cam_model, _epochs(config.cam_train.epochs, cam_batches), config.cam_train,
        steps_per_epoch * config.cam_train.epochs, device,
        on_epoch=lambda e, m: log(f"  cam epoch {e + 1}/{config.cam_train.epochs}: loss {m['loss']:.4f} "
                                  f"lr {m['lr']:.4f} {m['images_per_second']:.1f} img/s"),
    )
    timings["train_cam"] = time.perf_counter() - t

    # 2. Multi-scale CAMs (stride 4 for the walk, full resolution for mining and evaluation).
    t = time.perf_counter()
    cam_model.eval()
    cams = []
    for sample, image in zip(samples, images):
        normalized = normalize_images(image[None].to(device))[0]
        cams.append(multiscale_cams(cam_model, normalized, torch.as_tensor(sample.classes), config.cam_inference))
    timings["cam_inference"] = time.perf_counter() - t

    # 3. Relation mining: CRF-refined confident regions -> IR label maps.
    t = time.perf_counter()
    ir_labels = [
        ir_label_map(sample.image, cam.highres.cpu().numpy(), sample.classes, config.relations)
        for sample, cam in zip(samples, cams)
    ]
    timings["mine_relations"] = time.perf_counter() - t

    # 4. IRNet on the frozen CAM-trained backbone.
    t = time.perf_counter()
    irnet = IRNet(cam_model.backbone.channels)
    label_tensors = [torch.from_numpy(lab) for lab in ir_labels]

    def irn_batches(epoch: int) -> list[dict]:
        rng = np.random.default_rng([config.irn_train.seed, 1000 + epoch])
        order = rng.permutation(len(samples))
        batches = []
        for chunk in _batched(list(order), config.irn_train.batch_size):
            crops = [
                augment(images[i], label_tensors[i], rng, crop_size=config.irn_train.crop_size,
                        scale_range=config.irn_train.rescale, hflip=config.irn_train.hflip)
                for i in chunk
            ]
            batches.append({
                "image": torch.stack([c[0] for c in crops]),
                "labels": torch.stack([torch.from_numpy(downsample_labels(c[1].numpy())) for c in crops]),
            })
        return batches

    steps_per_epoch = -(-len(samples) // config.irn_train.batch_size)
    train_irn(
        cam_model.backbone, irnet, _epochs(config.irn_train.epochs, irn_batches), config.irn_train,
        config.relations, steps_per_epoch * config.irn_train.epochs, device,
        on_epoch=lambda e, m: log(f"  irn epoch {e + 1}/{config.irn_train.epochs}: loss {m['loss']:.4f} "
                                  f"(disp fg {m['displacement_fg']:.3f} bg {m['displacement_bg']:.3f} "
                                  f"boundary {m['boundary']:.3f}) {m['images_per_second']:.1f} img/s"),
    )
    irnet.mean_displacement.copy_(
        mean_displacement(cam_model.backbone, irnet, (torch.stack(b) for b in _batched(images, 32)), device)
    )
    timings["train_irn"] = time.perf_counter() - t

    # 5. Label synthesis and evaluation against the ground truth kept aside.
    t = time.perf_counter()
    names = class_names(num_classes)
    cam_eval = SemanticEvaluator(num_classes + 1)
    pseudo_eval = SemanticEvaluator(num_classes + 1)
    cam_cc_eval = InstanceEvaluator(num_classes, class_names=names)
    boundary_cc_eval = InstanceEvaluator(num_classes, class_names=names)
    full_eval = InstanceEvaluator(num_classes, class_names=names)
    irnet.eval()
    with torch.no_grad():
        for sample, image, cam in zip(samples, images, cams):
            height, width = sample.image.shape[:2]
            output = irnet(cam_model.backbone(normalize_images(image[None].to(device))), subtract_mean=True)
            labels = synthesize_labels(
                cam.strided, sample.classes, output.boundary[0], output.displacement[0], (height, width), config.synthesis
            )
            gt_masks, gt_classes = _gt_instances(sample)
            cam_labels = cam_semantic_labels(cam.highres, cam.classes, config.cam_inference.eval_background_threshold)
            cam_labels = cam_labels.cpu().numpy()
            cam_eval.process(cam_labels, sample.semantic)
            pseudo_eval.process(labels.semantic, sample.semantic)
            cc = cam_connected_components(cam_labels, cam.highres.cpu().numpy(), sample.classes)
            cam_cc_eval.process(cc.masks, cc.classes, cc.scores, gt_masks, gt_classes)
            # Same components rule on the propagated labels: the "CAM + class boundary" baseline.
            bcc = cam_connected_components(labels.semantic, cam.highres.cpu().numpy(), sample.classes)
            boundary_cc_eval.process(bcc.masks, bcc.classes, bcc.scores, gt_masks, gt_classes)
            ins = labels.instances
            full_eval.process(ins.masks, ins.classes, ins.scores, gt_masks, gt_classes)
    timings["synthesize_and_evaluate"] = time.perf_counter() - t

    cam_sem, pseudo_sem = cam_eval.evaluate(), pseudo_eval.evaluate()
    cam_cc, boundary_cc, full = cam_cc_eval.evaluate(), boundary_cc_eval.evaluate(), full_eval.evaluate()
    report = {
        "cam_miou": cam_sem["miou"],
        "pseudo_miou": pseudo_sem["miou"],
        "cam_cc_ap50": cam_cc["ap50"],
        "cam_cc_ap70": cam_cc["ap70"],
        "boundary_cc_ap50": boundary_cc["ap50"],
        "boundary_cc_ap70": boundary_cc["ap70"],
        "ap50": full["ap50"],
        "ap70": full["ap70"],
        "ir_label_coverage": float(np.mean([(lab != 255).mean() for lab in ir_labels]) * 100),
        "seconds": time.perf_counter() - started,
        "timings": timings,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": config_to_dict(config),
    }
    log(format_table(report))
    return report


def _gt_instances(sample) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(1, len(sample.instance_classes) + 1)
    masks = sample.instances[None] == ids[:, None, None]
    return masks, np.asarray(sample.instance_classes, dtype=np.int64)


def format_table(report: dict) -> str:
    rows = [
        ("CAM (raw, argmax with background 0.15)", "mIoU", report["cam_miou"]),
        ("CAM + boundary random walk (pseudo labels)", "mIoU", report["pseudo_miou"]),
        ("CAM + connected components", "AP^r_50 / AP^r_70", (report["cam_cc_ap50"], report["cam_cc_ap70"])),
        ("CAM + class boundary + components", "AP^r_50 / AP^r_70", (report["boundary_cc_ap50"], report["boundary_cc_ap70"])),
        ("IRNet full method (instances)", "AP^r_50 / AP^r_70", (report["ap50"], report["ap70"])),
    ]
    lines = ["", f"{'method':<46} {'metric':<18} value", "-" * 78]
    for name, metric, value in rows:
        text = f"{value[0]:6.1f} / {value[1]:.1f}" if isinstance(value, tuple) else f"{value:6.1f}"
        lines.append(f"{name:<46} {metric:<18} {text}")
    lines.append("-" * 78)
    lines.append(f"finished in {report['seconds']:.0f} s on {report['device']} ({report['torch_threads']} threads)")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True))
