"""The labeling job: Ray Data actor pools turning images into semantic + instance pseudo masks.

``label_images`` (:mod:`.job`) is the Python API and what ``irnet-ray label`` runs; the output
folder's protocol is in :mod:`irnet_ray.pipeline.commit_log`, its table schemas in :mod:`irnet_ray.data.output_format`.
"""

from .config import LabelJobConfig

__all__ = ["LabelJobConfig", "LabelJobError", "LabelJobFailed", "format_summary", "label_images"]


def __getattr__(name: str):
    # The job (torch, Ray) is imported when first used: `irnet-ray --help` reads LabelJobConfig only.
    if name == "LabelJobError":
        from irnet_ray.pipeline.commit_log import JobInputError

        return JobInputError
    if name in ("LabelJobFailed", "format_summary", "label_images"):
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
