"""Typed settings of every pipeline stage.

Defaults are the values of ``docs``/method.md (the paper plus the reference implementation).
Every config is a frozen dataclass that round-trips through plain JSON, so it can be recorded
next to every checkpoint and every output it produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


#: Peak memory one image's decoding may take (irnet_ray.data.decode.decode_memory_bytes); decode
#: tasks reserve it. 1 GiB decodes a 50 MP RGB photo or a 7000 x 7000 16-bit scan, and refuses
#: a 50 MP image with alpha (about 1.3 GiB to composite).
DEFAULT_MAX_DECODE_BYTES = 1 << 30
#: Times an image may end its worker process (native crash, out-of-memory kill) while processed
#: alone before it is recorded as ``crashed_worker`` (irnet_ray.pipeline.attempts).
DEFAULT_MAX_CRASHES = 2
#: Share of an output's images that may fail before a run ends with an error instead of a
#: manifest (wrong credentials or a wrong image root make every image fail).
DEFAULT_MAX_ERROR_RATE = 0.5
#: How training crops are filled where the image is smaller (CamTrainConfig.crop_padding).
CROP_PADDINGS = ("mean", "black")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def settings_id(settings: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``settings`` (recorded settings are compared by it)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build ``cls`` from ``values``; unknown keys are an error so typos never pass silently."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls, name, None)
        # JSON turns tuples into lists; restore them so configs compare equal after a round trip.
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """A torchvision ResNet with output stride 16 (last downsampling stride set to 1)."""

    arch: str = "resnet50"
    # A torchvision weight enum name ("IMAGENET1K_V1"), a local .pth/.safetensors file, or None
    # (random init: nothing can be downloaded on the build machines, so from-scratch must work).
    weights: str | None = None
    # Frozen BN (eval mode, no grads) as in the paper: per-GPU batches are small. Training from
    # scratch needs batch statistics, so this can be turned off for the CAM stage.
    frozen_batchnorm: bool = True
    # Stages before this index are not trained (reference: stem, layer1, layer2 -> 3).
    # 0 trains everything, which from-scratch training requires.
    first_trainable_stage: int = 3

    @classmethod
    def from_scratch(cls, arch: str = "resnet50") -> "BackboneConfig":
        """Random weights with every stage trained and batch-statistics BatchNorm: the settings
        training without pretrained weights needs."""
        return cls(arch=arch, weights=None, frozen_batchnorm=False, first_trainable_stage=0)

    def check_trainable(self) -> None:
        """Refuse a backbone that would train ~nothing: random weights (no ``weights``) kept as
        they are in frozen stages or frozen BatchNorm (the paper's settings, made for a
        pretrained backbone)."""
        frozen = [part for part, on in (
            (f"stages 0..{self.first_trainable_stage - 1} frozen", self.first_trainable_stage > 0),
            ("BatchNorm frozen", self.frozen_batchnorm)) if on]  # fmt: skip
        if self.weights is None and frozen:
            raise ValueError(
                f"the backbone has no pretrained weights but keeps parts of its random initialisation fixed "
                f"({', '.join(frozen)}): it would train almost nothing. Pass weights (--weights IMAGENET1K_V1, "
                "or a local .pth/.safetensors file), or train from scratch (--from-scratch; in Python "
                "BackboneConfig.from_scratch(arch))"
            )


@dataclasses.dataclass(frozen=True)
class CamTrainConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1  # head; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9  # the reference passes weight decay here by mistake
    poly_power: float = 0.9
    crop_size: int = 512
    rescale_long_side: tuple[int, int] = (320, 640)
    hflip: bool = True
    # What fills a crop where the image is smaller: "mean" (the mean colour, i.e. zeros after
    # normalising, as the reference pads) or "black".
    crop_padding: str = "mean"
    # Downscaling filters over the source pixels (as the reference's PIL resizing does) instead
    # of sampling 4 of them.
    antialias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_crop_padding(self.crop_padding)


@dataclasses.dataclass(frozen=True)
class CamInferenceConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    # Raw-CAM semantic labels for evaluation: constant background score, then argmax.
    eval_background_threshold: float = 0.15
    # IRNet's boundary map is sigmoid(mean of the edge logits of the image and of its mirror
    # image, flipped back), as the reference's EdgeDisplacement does; the displacement field
    # always comes from the unflipped image. False: the unflipped boundary alone.
    boundary_flip: bool = True
    # Batched inference: images whose height and width round up to the same multiple of this
    # share one bucket (one backbone call per scale), zero-padded in normalised space at the
    # bottom/right. 32 = 2 x the output stride: every default scale (0.5, 1, 1.5, 2) of a
    # bucket is then a whole number of stride-16 cells, and it halves the number of buckets of
    # 16 for about 4 % more padded pixels on VOC-sized images.
    bucket_multiple: int = 32
    # Arithmetic of the model passes: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or
    # "bf16". Label synthesis (random walk, refinement) always runs in fp32.
    precision: str = "auto"
    # Scales below 1 filter the source pixels (the reference downscales with PIL) instead of
    # sampling 4 of them, which aliases thin structures at scale 0.5.
    antialias: bool = True


@dataclasses.dataclass(frozen=True)
class RelationConfig:
    """Inter-pixel relation mining (method.md section 2)."""

    fg_threshold: float = 0.30
    bg_threshold: float = 0.05
    crf_gt_prob: float = 0.7
    crf_iterations: int = 10
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 10.0
    # Pair radius gamma on the stride-4 grid during IRNet training (Eq. 2).
    radius: int = 10


@dataclasses.dataclass(frozen=True)
class IrnTrainConfig:
    epochs: int = 3
    batch_size: int = 32
    # The reference's lr 0.1 / 1.0 run with momentum ~0 (its weight decay lands in SGD's
    # momentum slot); with real momentum 0.9 the same effective step is 0.01 / 0.1.
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    # The displacement branch learns ten times faster (reference: lr 1.0 vs 0.1).
    displacement_lr_scale: float = 10.0
    crop_size: int = 512
    rescale: tuple[float, float] = (0.5, 1.5)
    hflip: bool = True
    crop_padding: str = "mean"  # as CamTrainConfig
    antialias: bool = True  # as CamTrainConfig
    seed: int = 0

    def __post_init__(self) -> None:
        _check_crop_padding(self.crop_padding)


@dataclasses.dataclass(frozen=True)
class DeepLabTrainConfig:
    """``irnet-ray train-deeplab``: torchvision's ``deeplabv3_resnet50`` on the semantic pseudo masks.

    Defaults follow torchvision's segmentation reference (SGD lr 0.01, momentum 0.9, weight
    decay 1e-4, poly decay 0.9, 30 epochs, crops of 480 after a random rescale of 0.5-2x, auxiliary
    loss weighted 0.5), ``batch_size`` per worker. Pixels labeled 255 are ignored by the loss.
    """

    epochs: int = 30
    batch_size: int = 4
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    crop_size: int = 480
    rescale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    crop_padding: str = "mean"  # as CamTrainConfig; the padded pixels are ignored (255)
    antialias: bool = True  # as CamTrainConfig
    aux_loss: bool = True
    aux_weight: float = 0.5
    # Pixels of instances scoring below this become 255 (irnet_ray.downstream.runs.semantic_labels);
    # None: the semantic map as labeled.
    ignore_below: float | None = None
    # A ResNet-50 state dict (local file or s3:// URI) the backbone starts from; None: from scratch.
    backbone_weights: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_crop_padding(self.crop_padding)
        _check_training(self)


@dataclasses.dataclass(frozen=True)
class MaskRcnnTrainConfig:
    """``irnet-ray train-maskrcnn``: torchvision's ``maskrcnn_resnet50_fpn`` on the instance pseudo masks.

    Defaults follow torchvision's detection reference (SGD lr 0.02 for 8 workers x 2 images,
    momentum 0.9, weight decay 1e-4, 26 epochs, images resized to 800-1333, horizontal flips),
    except the schedule: the poly decay of the other stages instead of steps at epochs 16 and 22
    and a warm-up. Scale ``lr`` with the total batch (0.0025 for one worker of 2 images).
    """

    epochs: int = 26
    batch_size: int = 2
    lr: float = 0.02
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    min_size: int = 800
    max_size: int = 1333
    hflip: bool = True
    # Target filters (irnet_ray.downstream.runs.DEFAULT_SCORE_THRESHOLD / DEFAULT_MIN_AREA and why).
    score_threshold: float = 0.05
    min_area: int = 16
    # Backbone stages trained (0-5); None: torchvision's rule, 5 from scratch, 3 from backbone_weights.
    trainable_backbone_layers: int | None = None
    # A ResNet-50 state dict (local file or s3:// URI) the backbone starts from; None: from scratch.
    backbone_weights: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training(self)
        if not 0 < int(self.min_size) <= int(self.max_size):
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        layers = self.trainable_backbone_layers
        if layers is not None and not 0 <= int(layers) <= 5:
            raise ValueError(f"trainable_backbone_layers must be 0..5 (or None), got {layers}")


def _check_training(config: Any) -> None:
    for name in ("epochs", "batch_size"):
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 1, got {getattr(config, name)}")
    if float(config.lr) <= 0:
        raise ValueError(f"{type(config).__name__}.lr must be > 0, got {config.lr}")


def _check_crop_padding(value: str) -> None:
    if value not in CROP_PADDINGS:
        raise ValueError(f"crop_padding must be one of {', '.join(CROP_PADDINGS)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Label synthesis (method.md section 4)."""

    radius: int = 5
    beta: float = 10.0
    steps: int = 256
    # Semantic labels: constant background plane after dividing by the global max.
    sem_background_threshold: float = 0.25
    # Instance labels (Sec. 5.1-5.2, App. A.1).
    ins_background_threshold: float = 0.25
    displacement_iterations: int = 100
    centroid_threshold: float = 2.5
    min_instance_fraction: float = 0.01
    # Memory bounds of one image (none binds on normal images: VOC has at most ~20 objects).
    # Centroid groups beyond the cap are the smallest (fewest assigned pixels); their pixels go
    # to group 0 ("no centroid"). Instances beyond the cap are the lowest-scoring ones.
    max_groups: int = 64
    max_instances: int = 100


# --------------------------------------------------------------------------------------
# job resources (not the method's settings)

#: CPUs of one decode / write task: small, so they never starve the actors on a 2-core machine.
DEFAULT_TASK_CPUS = 0.25


@dataclasses.dataclass(frozen=True)
class MiningOptions:
    """Resources and sizes of the mining pipeline (not part of the method's settings).

    ``max_actors`` and ``batch_size`` ``None``: sized from the cluster
    (:mod:`irnet_ray.pipeline.resources`); ``use_gpu`` ``None``: when the cluster has GPUs.
    """

    max_side: int | None = None
    min_side: int = 16  # one cell of the stride-16 CAM; smaller images are recorded as too_small
    max_pixels: int = 50_000_000
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float = 1.0  # used only when the actors use GPUs
    cpus_per_actor: float = 1.0
    decode_cpus: float = DEFAULT_TASK_CPUS
    crf_cpus: float = 0.5  # one CRF task per half core: 1 actor + CRF + decode + write fit 2 CPUs
    write_cpus: float = DEFAULT_TASK_CPUS
    batch_size: int | None = None
    decode_batch_size: int = 4
    rows_per_file: int = 256
    use_gpu: bool | None = None
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # more failing images: no manifest, an error
    max_crashes: int = DEFAULT_MAX_CRASHES  # an image that ends its worker this often becomes crashed_worker

    def __post_init__(self) -> None:
        if self.max_side is not None and int(self.max_side) < 16:
            raise ValueError(f"MiningOptions.max_side must be >= 16 (or None), got {self.max_side}")
        if int(self.min_actors) < 1 or (self.max_actors is not None and int(self.min_actors) > int(self.max_actors)):
            raise ValueError(f"MiningOptions needs 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        for name in ("cpus_per_actor", "decode_cpus", "crf_cpus", "write_cpus"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"MiningOptions.{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "decode_batch_size", "rows_per_file"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"MiningOptions.{name} must be >= 1, got {getattr(self, name)}")


#: ``irnet-ray visualize``: the figure's file name, the images shown when no ids are given (the
#: first ones of the set), and the long side images are downscaled to first (as for labeling).
VISUALIZE_FIGURE_NAME = "figure6.png"
VISUALIZE_DEFAULT_LIMIT = 8
VISUALIZE_DEFAULT_MAX_SIDE = 512
