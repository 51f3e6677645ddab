"""Settings of the labeling job: what decides the labels, and how the pipeline runs."""

from __future__ import annotations

import dataclasses

from irnet_ray.config import (
    DEFAULT_MAX_CRASHES,
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_ERROR_RATE,
    CamInferenceConfig,
    SynthesisConfig,
    config_from_dict,
    config_to_dict,
    settings_id,
)

__all__ = ["LabelJobConfig", "label_settings", "settings_id", "config_from_settings"]

#: The fields of :class:`LabelJobConfig` that change the labels; the rest only change how fast
#: they are made. A rerun on the same output must agree on these (and on the models).
LABEL_FIELDS = ("cam_inference", "synthesis", "max_side", "min_side", "max_pixels", "max_decode_bytes")


@dataclasses.dataclass(frozen=True)
class LabelJobConfig:
    """The labeling job.

    Labels: CAM inference and synthesis settings; images are labeled downscaled so that their
    long side is at most ``max_side`` (``None``: as they are; the stride-4 random walk on a
    4000 x 4000 image would have 1M nodes) and the masks are brought back to the original size
    (nearest neighbour). Images with a side below ``min_side`` pixels (one cell of the stride-16
    CAM), more than ``max_pixels`` pixels or whose decoding would take more than
    ``max_decode_bytes`` (judged from the header; each decode task reserves that much memory) are
    recorded as errors (``too_small``, ``too_large``).

    Pipeline: ``batch_size`` images per call of a labeling actor (``None``: 16 on a GPU, 4 on a
    CPU), ``decode_batch_size`` per decode task; ``min_actors``..``max_actors`` actors (the pool
    grows and shrinks with the cluster; ``max_actors`` ``None``: one per GPU of the cluster, or
    what fits its CPUs; see :mod:`irnet_ray.pipeline.resources`); ``gpus_per_actor`` (``None``:
    1 when the cluster has GPUs, else 0; fractions pack several actors on a GPU), ``cpus_per_actor`` (torch threads follow it), ``decode_cpus`` and
    ``write_cpus`` per CPU task; Parquet files of at most ``rows_per_file`` rows.
    """

    cam_inference: CamInferenceConfig = CamInferenceConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    max_side: int | None = 1024
    min_side: int = 16
    max_pixels: int = 50_000_000
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    batch_size: int | None = None
    decode_batch_size: int = 4
    rows_per_file: int = 1000
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    decode_cpus: float = 0.25
    write_cpus: float = 0.25
    max_crashes: int = DEFAULT_MAX_CRASHES  # an image that ends its worker this often becomes crashed_worker
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # more failing images: no manifest, a non-zero exit
    evaluate: bool = True  # score the labels where the input has ground truth

    def __post_init__(self) -> None:
        if self.max_side is not None and int(self.max_side) < 16:
            raise ValueError(f"max_side must be >= 16 pixels (or None), got {self.max_side}")
        if int(self.min_side) < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_side is not None and int(self.min_side) > int(self.max_side):
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        if int(self.max_decode_bytes) < 1:
            raise ValueError(f"max_decode_bytes must be >= 1, got {self.max_decode_bytes}")
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        for name in ("batch_size", "decode_batch_size", "rows_per_file"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.min_actors) < 1 or (self.max_actors is not None and int(self.min_actors) > int(self.max_actors)):
            raise ValueError(f"need 1 <= min_actors <= max_actors, got min {self.min_actors}, max {self.max_actors}")
        if self.gpus_per_actor is not None and float(self.gpus_per_actor) < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if not 0.0 <= float(self.max_error_rate) <= 1.0:
            raise ValueError(f"max_error_rate must lie in [0, 1], got {self.max_error_rate}")
        for name in ("cpus_per_actor", "decode_cpus", "write_cpus"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.cam_inference.scales or 1.0 not in self.cam_inference.scales:
            # The shared backbone pass (IRNet's input) is the scale-1.0 pass of CAM inference.
            raise ValueError(f"cam_inference.scales must include 1.0, got {self.cam_inference.scales}")


def label_settings(config: LabelJobConfig) -> dict:
    """The label-deciding settings of ``config`` as plain JSON (recorded with the output)."""
    values = config_to_dict(config)
    return {name: values[name] for name in LABEL_FIELDS}


def config_from_settings(settings: dict) -> tuple[CamInferenceConfig, SynthesisConfig]:
    """The inference and synthesis configs of recorded settings (inside the actors)."""
    return (
        config_from_dict(CamInferenceConfig, settings["cam_inference"]),
        config_from_dict(SynthesisConfig, settings["synthesis"]),
    )
