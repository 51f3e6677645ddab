"""The labeling job: Ray Data actor pools turning images into semantic + instance pseudo masks.

``label_images`` (:mod:`.job`) is the Python API and what ``irnet-ray label`` runs; the output
folder's protocol is in :mod:`irnet_ray.pipeline.commit_log`, its table schemas in :mod:`irnet_ray.data.output_format`.
"""

from irnet_ray.pipeline.commit_log import JobInputError as LabelJobError

from .config import LabelJobConfig
from .job import LabelJobFailed, format_summary, label_images

__all__ = ["LabelJobConfig", "LabelJobError", "LabelJobFailed", "format_summary", "label_images"]
