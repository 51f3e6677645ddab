"""Trained models on disk or object storage: ``model.pt`` + ``model.json`` in one folder.

A model folder (local path, ``file://`` or ``s3://`` URI) holds

* ``model.pt``: a plain state dict (parameter name -> tensor) written by ``torch.save``.
  It is read back with ``torch.load(..., weights_only=True)`` only: loading never unpickles
  arbitrary objects, so a model folder from an untrusted place cannot run code.
* ``model.json``: what the weights are: ``kind`` (``"cam"`` or ``"irn"``), the settings that
  produced them (``config``, plain JSON), the class vocabulary, the per-epoch metrics, the
  creation time, the ``irnet_ray`` version and ``extra`` (for IRNet the mean displacement, which
  also lives in the state dict as the buffer ``mean_displacement``).

Nothing here imports Ray: the Ray Train wiring writes the final model with :func:`save_model`,
and the labeling job (or a notebook) builds the networks with :func:`load_cam_model` /
:func:`load_irn_model`. Credentials never enter a model folder: :func:`save_model` refuses
metadata with keys that look like secrets.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import re
from typing import Any, Mapping

import torch

import irnet_ray
from irnet_ray.config import BackboneConfig, config_from_dict
from irnet_ray.data.sources import ClassVocabulary
from irnet_ray.data.storage import StorageOptions, join, read_bytes, write_bytes

__all__ = [
    "MODEL_WEIGHTS",
    "MODEL_META",
    "MODEL_KINDS",
    "save_model",
    "load_model",
    "state_dict_to_bytes",
    "state_dict_from_bytes",
    "assert_no_secrets",
    "build_cam_model",
    "build_irn_model",
    "load_cam_model",
    "load_irn_model",
]

MODEL_WEIGHTS = "model.pt"
MODEL_META = "model.json"
MODEL_KINDS = ("cam", "irn")
FORMAT_VERSION = 1

_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|private_key", re.IGNORECASE)


def assert_no_secrets(value: Any, where: str = "model metadata") -> None:
    """Raise ``ValueError`` if any dict key (at any depth) looks like a credential."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if _SECRET_KEY.search(str(key)):
                raise ValueError(f"{where} must not hold credentials, found a key named {key!r}")
            assert_no_secrets(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_no_secrets(item, where)


def state_dict_to_bytes(state: Mapping[str, Any]) -> bytes:
    """``torch.save`` of a state dict (tensors, numbers, strings and containers of them)."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(state), buffer)
    return buffer.getvalue()


def state_dict_from_bytes(data: bytes) -> Any:
    """Inverse of :func:`state_dict_to_bytes`; ``weights_only=True``: never runs pickled code."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def save_model(
    directory: str,
    *,
    kind: str,
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    vocabulary: ClassVocabulary,
    metrics: list[dict],
    extra: dict | None = None,
    options: StorageOptions = StorageOptions(),
) -> str:
    """Write ``model.pt`` and ``model.json`` into ``directory``; returns the folder URI.

    ``model.pt`` is written first, so a folder whose ``model.json`` exists is complete (each
    file is written atomically by :func:`irnet_ray.data.storage.write_bytes`).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not isinstance(vocabulary, ClassVocabulary):
        raise TypeError(f"vocabulary must be a ClassVocabulary, got {type(vocabulary).__name__}")
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, expected a tensor")
        tensors[name] = value
    extra = dict(extra or {})
    if kind == "irn":
        if "mean_displacement" not in tensors:
            raise ValueError("an IRNet state dict must hold the buffer 'mean_displacement'")
        extra["mean_displacement"] = [float(v) for v in tensors["mean_displacement"].flatten()]
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "vocabulary": list(vocabulary.names),
        "metrics": list(metrics),
        "extra": extra,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "irnet_ray_version": irnet_ray.__version__,
        "torch_version": torch.__version__,
    }
    assert_no_secrets(meta)
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=True)
    write_bytes(join(directory, MODEL_WEIGHTS), state_dict_to_bytes(tensors), options)
    write_bytes(join(directory, MODEL_META), text.encode("utf-8"), options)
    return directory


def load_model(directory: str, options: StorageOptions = StorageOptions()) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` of a folder written by :func:`save_model` (local or ``s3://``).

    Missing files raise :class:`irnet_ray.data.storage.StorageNotFound`; a folder that is not
    a model raises ``ValueError``.
    """
    meta = json.loads(read_bytes(join(directory, MODEL_META), options).decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("kind") not in MODEL_KINDS:
        raise ValueError(f"{directory}: {MODEL_META} is not an irnet-ray model description")
    state = state_dict_from_bytes(read_bytes(join(directory, MODEL_WEIGHTS), options))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{directory}: {MODEL_WEIGHTS} is not a state dict of tensors")
    return state, meta


# --------------------------------------------------------------------------------------
# networks from saved models


def _backbone_config(meta: dict) -> BackboneConfig:
    try:
        values = dict(meta["config"]["backbone"])
    except (KeyError, TypeError):
        raise ValueError("model metadata has no config.backbone settings") from None
    # Weights were trained: never re-download or re-read the initial weights.
    values["weights"] = None
    return config_from_dict(BackboneConfig, values)


def build_cam_model(state_dict: Mapping[str, torch.Tensor], meta: dict):
    """A :class:`~irnet_ray.models.cam.CamNet` with the saved weights (eval mode)."""
    from irnet_ray.models.cam import CamNet

    if meta.get("kind") != "cam":
        raise ValueError(f"expected a CAM model, got kind {meta.get('kind')!r}")
    model = CamNet(_backbone_config(meta), len(meta["vocabulary"]))
    model.load_state_dict(state_dict)
    return model.eval()


def build_irn_model(state_dict: Mapping[str, torch.Tensor], meta: dict, channels: tuple[int, ...]):
    """An :class:`~irnet_ray.models.irnet.IRNet` (mean displacement included, eval mode)."""
    from irnet_ray.models.irnet import IRNet

    if meta.get("kind") != "irn":
        raise ValueError(f"expected an IRNet model, got kind {meta.get('kind')!r}")
    model = IRNet(tuple(channels))
    model.load_state_dict(state_dict)
    return model.eval()


def load_cam_model(directory: str, options: StorageOptions = StorageOptions()):
    """``(CamNet, meta)`` from a CAM model folder."""
    state, meta = load_model(directory, options)
    return build_cam_model(state, meta), meta


def load_irn_model(
    directory: str, options: StorageOptions = StorageOptions(), cam_directory: str | None = None
):
    """``(IRNet, CamNet, meta)``: IRNet and the CAM network whose backbone it was trained on.

    ``cam_directory`` defaults to the CAM model recorded in the IRNet model's metadata.
    """
    state, meta = load_model(directory, options)
    cam_directory = cam_directory or meta.get("config", {}).get("cam_model")
    if not cam_directory:
        raise ValueError(f"{directory}: the IRNet model does not name its CAM model; pass cam_directory")
    cam, _ = load_cam_model(cam_directory, options)
    return build_irn_model(state, meta, cam.backbone.channels), cam, meta
