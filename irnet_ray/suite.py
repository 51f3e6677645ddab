"""The benchmark suite (``irnet-ray benchmark``): the whole method, at one set of settings, on
synthetic families that each stress one weakness of CAMs or of the random walk.

The demo's figures come from one synthetic family whose settings were tuned on it; a method
that only holds there is not a labeling system. Each family here is the built-in generator
(:mod:`irnet_ray.data.synthetic`) with the knobs that make one thing hard, generated on the fly
with a fixed seed, and run through every stage exactly as the demo runs it
(:func:`irnet_ray.demo.run_demo`: Ray Train, Ray Data, the same method settings). One table
comes out: CAM mIoU, pseudo-label mIoU, AP^r_50/70 of CAM + components, of CAM + class
boundary + components and of the full method, and whether the family meets the targets the
paper's gains set (:data:`MIOU_GAIN_TARGET`, :data:`AP50_RATIO_TARGET`).

``smoke=True`` runs the same families tiny (12 images of 64 px, one epoch per stage, 2 panels):
a check that every family runs end to end, not a measurement. The ``demo`` family's smoke
configuration is the tiny demo of ``tests/test_demo.py``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from irnet_ray.config import (
    BackboneConfig,
    CamInferenceConfig,
    CamTrainConfig,
    IrnTrainConfig,
    SynthesisConfig,
    config_to_dict,
)
from irnet_ray.data.synthetic import SyntheticConfig
from irnet_ray.demo import DemoConfig

__all__ = ["Family", "FAMILIES", "SUITE_DATA", "family_config", "run_suite", "format_suite", "meets_targets"]

#: Pseudo labels must beat their CAM by this many mIoU points (the paper: +18.2 on VOC).
MIOU_GAIN_TARGET = 15.0
#: The full method's AP^r_50 must be this many times CAM + components' (the paper: 4.4x).
AP50_RATIO_TARGET = 4.0


@dataclasses.dataclass(frozen=True)
class Family:
    """A synthetic family: ``data`` overrides of the suite's base set; ``stresses`` what it makes hard."""

    name: str
    stresses: str
    data: dict


FAMILIES: tuple[Family, ...] = (
    Family("demo", "nothing in particular: the demo's own set (384 images of 256 px)", {}),
    Family("small-parts", "the class cue (the emblem) covers 5-10% of a large object: CAMs fire on the emblem only",
           {"mark_fraction": (0.05, 0.10), "object_size": (30.0, 64.0)}),
    Family("textureless", "flat, noiseless backgrounds: no boundary stops the walk from flooding them",
           {"num_background_blobs": (0, 0), "num_distractors": (0, 0), "noise_std": 0.0}),
    Family("clutter", "cluttered backgrounds: many blobs and emblem-less distractor shapes, strong noise",
           {"num_background_blobs": (24, 40), "num_distractors": (4, 8), "noise_std": 12.0}),
    Family("touching", "2-6 instances an image, touching same-class pairs in 90% of the images",
           {"touching_probability": 0.9, "min_instances": 2, "max_instances": 6, "max_classes_per_image": 2}),
    Family("scales", "objects from 10 to 76 px per 128 px on 320 px images: a wide range of scales",
           {"image_size": (320, 320), "object_size": (10.0, 76.0)}),
)  # fmt: skip

#: The base set of every family but ``demo``: smaller than the demo's so the suite fits in 45
#: minutes on 2 cores (the demo family alone takes the demo's 15).
SUITE_DATA = SyntheticConfig(num_images=192, image_size=(192, 192), num_classes=4, seed=0)


def family_config(family: Family, seed: int = 0, smoke: bool = False) -> DemoConfig:
    """The demo's settings (the method's, unchanged) on ``family``'s data; ``smoke``: tiny."""
    if smoke:
        data = dataclasses.replace(SUITE_DATA, **{k: v for k, v in family.data.items() if k != "image_size"},
                                   num_images=12, image_size=(64, 64), num_classes=2, seed=seed)  # fmt: skip
        return DemoConfig(
            data=data,
            backbone=BackboneConfig(arch="resnet18", frozen_batchnorm=False, first_trainable_stage=0),
            cam_train=CamTrainConfig(epochs=1, batch_size=6, crop_size=64, rescale_long_side=(56, 72), seed=seed),
            cam_inference=CamInferenceConfig(scales=(1.0,)),
            irn_train=IrnTrainConfig(epochs=1, batch_size=6, crop_size=64, seed=seed),
            synthesis=SynthesisConfig(steps=16, displacement_iterations=10),
            device="cpu", panels=2,
        )  # fmt: skip
    demo = DemoConfig()
    base = demo.data if family.name == "demo" else SUITE_DATA
    data = dataclasses.replace(base, **family.data, seed=seed)
    return dataclasses.replace(demo, data=data, cam_train=dataclasses.replace(demo.cam_train, seed=seed),
                               irn_train=dataclasses.replace(demo.irn_train, seed=seed), panels=0)  # fmt: skip


def meets_targets(row: dict) -> dict:
    """``{"miou_gain": bool, "ap50_ratio": bool}`` of one result row (``None`` when a figure is missing)."""
    cam, pseudo, cc, full = (row.get(k) for k in ("cam_miou", "pseudo_miou", "cam_cc_ap50", "ap50"))
    gain = None if cam is None or pseudo is None else pseudo - cam >= MIOU_GAIN_TARGET
    ratio = None if cc is None or full is None else full >= AP50_RATIO_TARGET * cc and full > 0
    return {"miou_gain": gain, "ap50_ratio": ratio}


def run_suite(families: Sequence[str] | None = None, workdir: str = "runs/benchmark", *, seed: int = 0,
              smoke: bool = False, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run ``families`` (names of :data:`FAMILIES`; all by default) one after another, each as
    the demo runs (resuming a family whose outputs are complete), and return ``{"rows": [...],
    "seconds", "seed", "smoke"}``; each row holds the family, its figures and its targets."""
    from irnet_ray.demo import run_demo

    known = {f.name: f for f in FAMILIES}
    names = list(families or known)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown benchmark famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown) or '(none)'}; "
                         f"known: {', '.join(known)}")  # fmt: skip
    started, rows = time.perf_counter(), []
    for name in names:
        family = known[name]
        log(f"== {name}: {family.stresses}")
        config = family_config(family, seed=seed, smoke=smoke)
        report = run_demo(config, workdir=f"{workdir.rstrip('/')}/{name}", log=log)
        row = {"family": name, **{k: report[k] for k in ("cam_miou", "pseudo_miou", "cam_cc_ap50", "cam_cc_ap70",
                                                          "boundary_cc_ap50", "boundary_cc_ap70", "ap50", "ap70")},
               "seconds": report["seconds"], "images": config.data.num_images, "image_size": list(config.data.image_size),
               "data": config_to_dict(config.data)}  # fmt: skip
        row["targets"] = meets_targets(row)
        rows.append(row)
        log(format_suite({"rows": rows}))
    return {"rows": rows, "seconds": time.perf_counter() - started, "seed": int(seed), "smoke": bool(smoke)}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_suite(result: dict) -> str:
    """The suite's table (Markdown) with each family's targets."""
    lines = [
        "| family | CAM mIoU | pseudo mIoU | gain | CAM+CC AP50 / 70 | +boundary AP50 / 70 | full AP50 / 70 | AP50 ratio | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for row in result["rows"]:
        cam, pseudo, cc, full = (row.get(k) for k in ("cam_miou", "pseudo_miou", "cam_cc_ap50", "ap50"))
        gain = "n/a" if cam is None or pseudo is None else f"{pseudo - cam:+.1f}"
        ratio = "n/a" if cc is None or full is None else ("inf" if cc == 0 and full > 0 else
                                                             f"{full / cc:.1f}x" if cc else "0")  # fmt: skip
        met = meets_targets(row)
        marks = " ".join(f"{name} {'yes' if ok else 'no' if ok is not None else 'n/a'}" for name, ok in
                         (("gain>=15", met["miou_gain"]), ("ratio>=4", met["ap50_ratio"])))  # fmt: skip
        lines.append(f"| {row['family']} | {_pct(cam)} | {_pct(pseudo)} | {gain} | {_pct(cc)} / {_pct(row.get('cam_cc_ap70'))} "
                     f"| {_pct(row.get('boundary_cc_ap50'))} / {_pct(row.get('boundary_cc_ap70'))} "
                     f"| {_pct(full)} / {_pct(row.get('ap70'))} | {ratio} | {marks} |")  # fmt: skip
    return "\n".join(lines)
