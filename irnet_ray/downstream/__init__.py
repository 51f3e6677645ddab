"""Downstream of labeling: training data readers and COCO / VOC exports (``docs/downstream.md``).

* :mod:`.runs` (no torch): :func:`open_labels`, :class:`LabelRun`, :class:`LabelRunError`, filters.
* :mod:`.readers` (torch): :func:`instance_targets`, :func:`semantic_target`, :class:`LabelDataset`,
  :func:`label_dataset_ray`.
* :mod:`.export` (no torch): :func:`export_coco`, :func:`export_voc`.

Names are imported on first use, so ``from irnet_ray.downstream import export_coco`` does not
import torch (the ``irnet-ray export`` command starts in a fraction of a second).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "open_labels": "runs", "LabelRun": "runs", "LabelRunError": "runs", "kept_instances": "runs",
    "semantic_labels": "runs", "DEFAULT_SCORE_THRESHOLD": "runs", "DEFAULT_MIN_AREA": "runs",
    "IGNORE_INDEX": "runs",
    "masks_to_boxes": "readers", "instance_targets": "readers", "semantic_target": "readers",
    "LabelDataset": "readers", "detection_collate": "readers", "label_dataset_ray": "readers",
    "ExportError": "export", "export_coco": "export", "export_voc": "export", "voc_name": "export",
    "image_id_from_voc_name": "export",
}  # fmt: skip

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
