"""Pieces shared by the labeling benchmarks (``label_throughput.py``, ``gpu_label.py``).

Only :mod:`irnet_ray.inference` and what it imports (torch, torchvision, NumPy, SciPy) plus the
built-in synthetic set are needed here: the GPU machine has no Ray, boto3 or pycocotools, so
nothing on this path may import them. Trained model folders (``--cam`` / ``--irn``) are read with
:mod:`irnet_ray.model_files`, imported only when they are asked for.

Stage times. :func:`irnet_ray.inference.label_image` reports ``inference`` and ``synthesis``;
the batched :func:`irnet_ray.inference.label_batch` may also report ``walk`` and ``instances``.
So that both modes get the same four-way split (inference / walk / instances / other), a
:class:`StageProbe` times the random walk and the instance map where
:func:`irnet_ray.synthesis.synthesize_labels` calls them, by wrapping the module's functions
while a measurement runs. Where ``label_batch`` reports a stage itself, its own figure wins
(it may not go through those functions at all).
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

#: The split every mode is reported in; ``other`` is the wall time the three do not explain
#: (image to tensor, upsampling the walked maps, making the labels, Python).
SHARES = ("inference", "walk", "instances", "other")
#: Probed functions of :mod:`irnet_ray.synthesis`, by stage.
PROBED = {"walk": ("random_walk", "random_walk_batch"), "instances": ("instance_map",)}
#: Reported stage sums may exceed the wall time by this fraction before the split calls it an
#: overlap (timer resolution, the probes' own cost).
OVERLAP_TOLERANCE = 0.02
#: Foreground classes of the synthetic set (its default); images hold 1-3 of them.
SYNTHETIC_CLASSES = 4
MAX_CLASSES_PER_IMAGE = 3


def seeded_models(arch: str, num_classes: int = SYNTHETIC_CLASSES, seed: int = 0):
    """CAM network and IRNet with seeded random weights, in eval mode, on the CPU.

    The cost of labeling does not depend on what the weights learned, except through the
    number of instances the displacement field produces.
    """
    from irnet_ray.config import BackboneConfig
    from irnet_ray.models.cam import CamNet
    from irnet_ray.models.irnet import IRNet

    torch.manual_seed(seed)
    cam = CamNet(BackboneConfig(arch=arch), num_classes)
    irn = IRNet(cam.backbone.channels)
    return cam.eval(), irn.eval()


def trained_models(cam_dir: str, irn_dir: str):
    """Models from ``irnet-ray train-cam`` / ``train-irn`` folders (local paths or URIs)."""
    from irnet_ray.model_files import check_model_pair, load_model_pair

    cam, irn = load_model_pair(check_model_pair(cam_dir, irn_dir))
    return cam.eval(), irn.eval()


def synthetic_images(count: int, side: int, num_classes: int = SYNTHETIC_CLASSES, seed: int = 0):
    """``count`` built-in synthetic ``side`` x ``side`` images as ``(images, classes)`` lists."""
    from irnet_ray.data.synthetic import SyntheticConfig, SyntheticDataset

    dataset = SyntheticDataset(SyntheticConfig(num_images=count, image_size=(side, side), num_classes=num_classes,
                                               max_classes_per_image=MAX_CLASSES_PER_IMAGE, seed=seed))  # fmt: skip
    samples = list(dataset)
    return [s.image for s in samples], [s.classes.tolist() for s in samples]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StageProbe:
    """Seconds spent in the random walk and the instance map while the probe is active.

    Only the outermost probed call counts (``random_walk`` calls ``random_walk_batch``). CUDA
    results are waited for, so the times are real on a GPU too (the labels are copied to the
    CPU right after anyway).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    _depth: int = 0

    def __enter__(self) -> StageProbe:
        import irnet_ray.synthesis as synthesis

        self._saved = {}
        for stage, names in PROBED.items():
            for name in names:
                original = getattr(synthesis, name)
                self._saved[name] = original
                setattr(synthesis, name, self._wrap(stage, original))
        return self

    def __exit__(self, *exc) -> None:
        import irnet_ray.synthesis as synthesis

        for name, original in self._saved.items():
            setattr(synthesis, name, original)

    def _wrap(self, stage: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                _wait_for(result)
                return result
            finally:
                self._depth -= 1
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        return timed


def _wait_for(result) -> None:
    tensors = result if isinstance(result, (list, tuple)) else [result]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
            return


def stage_split(wall: float, reported: dict[str, float], probed: dict[str, float]) -> dict:
    """Seconds and shares of the wall time per :data:`SHARES` stage.

    ``reported``: the labeling function's own ``timings`` (missing keys are fine); ``probed``:
    a :class:`StageProbe`'s. ``walk`` / ``instances`` come from ``reported`` where present.
    ``synthesis`` in ``reported`` is not used: for ``label_image`` it encloses walk and
    instances, and whatever it holds besides them is in ``other``. Stage sums above the wall
    time (a pipelined implementation overlapping stages) leave ``other`` at 0 and are reported
    as ``overlap_seconds``.
    """
    seconds = {"inference": float(reported.get("inference", 0.0))}
    for stage in ("walk", "instances"):
        seconds[stage] = float(reported[stage] if stage in reported else probed.get(stage, 0.0))
    known = sum(seconds.values())
    overlap = max(0.0, known - wall * (1.0 + OVERLAP_TOLERANCE))
    seconds["other"] = max(0.0, wall - known)
    total = max(wall, known) if wall > 0 else 1.0
    return {
        "seconds": seconds,
        "shares": {stage: seconds[stage] / total for stage in SHARES},
        "overlap_seconds": overlap,
        "reported_keys": sorted(reported),
    }


def semantic_agreement(first, second) -> float:
    """Fraction of pixels with the same semantic label, over lists of label arrays."""
    same = sum(int(np.count_nonzero(np.asarray(a) == np.asarray(b))) for a, b in zip(first, second, strict=True))
    total = sum(np.asarray(a).size for a in first)
    return same / total if total else 1.0


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (``8,16,32``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cam_scales(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated CAM scales, which must include 1.0 (IRNet's shared pass)."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1.0,0.5, got {text!r}") from None
    if 1.0 not in values:
        raise argparse.ArgumentTypeError(f"the scales must include 1.0 (IRNet's pass), got {text!r}")
    return values
