"""Trained models on disk or object storage: ``model.pt`` + ``model.json`` in one folder.

A model folder (local path, ``file://`` or ``s3://`` URI) holds

* ``model.pt``: a plain state dict (parameter name -> tensor) written by ``torch.save``.
  It is read back with ``torch.load(..., weights_only=True)`` only: loading never unpickles
  arbitrary objects, so a model folder from an untrusted place cannot run code.
* ``model.json``: what the weights are: ``kind`` (``"cam"``, ``"irn"``, or ``"deeplab"`` / ``"maskrcnn"``
  for the models trained on the pseudo masks), the settings that
  produced them (``config``, plain JSON), the class vocabulary, the per-epoch metrics, the
  creation time, the ``irnet_ray`` version and ``extra`` (for IRNet the mean displacement, which
  also lives in the state dict as the buffer ``mean_displacement``).

This is the one module that reads and writes model folders (no Ray here):

* :func:`save_model` (Ray Train's driver writes the final model with it);
* :func:`read_model_meta`: ``model.json`` only, never the weights (vocabulary, kind, settings);
* :func:`check_model_pair` / :func:`load_model_pair`: the checked loader of the CAM + IRNet pair
  that labeling, ``irnet-ray visualize`` and every other inference stage use. The driver checks
  once (user mistakes fail before any work starts) and records each model's id,
  ``sha256:<hex>`` of its ``model.pt`` bytes; every actor checks that the weights it loaded are
  the ones the driver checked (a folder's URI can be reused for other weights);
* :func:`check_cam_model` / :func:`load_cam_model` for relation mining, which needs the CAM only.

Credentials never enter a model folder: :func:`save_model` refuses metadata with keys that look
like secrets.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

import irnet_ray
from irnet_ray.config import BackboneConfig, config_from_dict
from irnet_ray.data.sources import ClassVocabulary
from irnet_ray.data.storage import StorageNotFound, StorageOptions, join, normalize, read_bytes, write_bytes

__all__ = [
    "ModelFileError",
    "ModelPair",
    "CamModelRef",
    "model_id",
    "read_model_meta",
    "check_model_pair",
    "load_model_pair",
    "check_cam_model",
    "load_checked_cam",
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
MODEL_KINDS = ("cam", "irn", "deeplab", "maskrcnn")  # the last two: trained on the pseudo masks
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


# --------------------------------------------------------------------------------------
# checked references for inference jobs (the driver checks, the actors load and verify)


class ModelFileError(ValueError):
    """A model folder is missing, is not an irnet-ray model, or does not fit the other model."""


def model_id(weights: bytes) -> str:
    return "sha256:" + hashlib.sha256(weights).hexdigest()


def read_model_meta(uri: str, options: StorageOptions = StorageOptions(), flag: str = "model") -> dict:
    """``model.json`` of a model folder (kind, settings, vocabulary); never reads the weights."""
    try:
        meta = json.loads(read_bytes(join(uri, MODEL_META), options).decode("utf-8"))
    except StorageNotFound:
        raise ModelFileError(
            f"{flag} {uri}: no model there (expected {MODEL_META} and {MODEL_WEIGHTS} from irnet-ray training)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{flag} {uri}: {MODEL_META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in MODEL_KINDS:
        raise ModelFileError(f"{flag} {uri}: {MODEL_META} is not an irnet-ray model description")
    return meta


def _read_checked(uri: str, options: StorageOptions, flag: str, kind: str) -> tuple[bytes, dict]:
    meta = read_model_meta(uri, options, flag)
    if meta["kind"] != kind:
        expected = {"cam": "a CAM ('cam')", "irn": "an IRNet ('irn')"}[kind]
        raise ModelFileError(f"{flag} {uri} holds a {meta['kind']!r} model, expected {expected} model")
    try:
        weights = read_bytes(join(uri, MODEL_WEIGHTS), options)
    except StorageNotFound:
        raise ModelFileError(f"{flag} {uri}: {MODEL_WEIGHTS} is missing") from None
    return weights, meta


@dataclass(frozen=True)
class CamModelRef:
    """A checked CAM model: where it is, which weights, what it was trained on."""

    uri: str
    id: str
    created: str | None
    vocabulary: tuple[str, ...]

    def record(self) -> dict:
        return {"cam": {"uri": self.uri, "id": self.id, "created": self.created}}


@dataclass(frozen=True)
class ModelPair:
    """A checked CAM + IRNet pair (the labeling models)."""

    cam_uri: str
    irn_uri: str
    cam_id: str
    irn_id: str
    cam_created: str | None
    irn_created: str | None
    vocabulary: tuple[str, ...]

    def record(self) -> dict:
        """The models as recorded with every output they made."""
        return {
            "cam": {"uri": self.cam_uri, "id": self.cam_id, "created": self.cam_created},
            "irn": {"uri": self.irn_uri, "id": self.irn_id, "created": self.irn_created},
        }


def _build_pair(cam_weights: bytes, cam_meta: dict, irn_weights: bytes, irn_meta: dict):
    cam = build_cam_model(state_dict_from_bytes(cam_weights), cam_meta)
    irn = build_irn_model(state_dict_from_bytes(irn_weights), irn_meta, cam.backbone.channels)
    return cam, irn


def check_cam_model(uri: str, options: StorageOptions = StorageOptions(), flag: str = "--cam") -> CamModelRef:
    """Read and build the CAM model once in the driver; returns its checked reference."""
    weights, meta = _read_checked(uri, options, flag, "cam")
    try:
        build_cam_model(state_dict_from_bytes(weights), meta)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{flag} {uri} cannot be loaded: {exc}") from None
    return CamModelRef(uri=uri, id=model_id(weights), created=meta.get("created"),
                       vocabulary=tuple(meta["vocabulary"]))  # fmt: skip


def load_checked_cam(ref: CamModelRef, options: StorageOptions = StorageOptions()):
    """The CAM network of ``ref`` (eval mode, CPU); raises if the weights changed since the check."""
    weights, meta = _read_checked(ref.uri, options, "--cam", "cam")
    if model_id(weights) != ref.id:
        raise ModelFileError(f"the CAM model's weights changed while the job ran (expected {ref.id})")
    return build_cam_model(state_dict_from_bytes(weights), meta)


def check_model_pair(cam_uri: str | None, irn_uri: str, options: StorageOptions = StorageOptions()) -> ModelPair:
    """Read and build both models once (user mistakes fail here, before any work starts).

    ``cam_uri`` ``None``: the CAM model IRNet was trained with (recorded in its metadata).
    """
    irn_weights, irn_meta = _read_checked(irn_uri, options, "--irn", "irn")
    recorded = (irn_meta.get("config") or {}).get("cam_model")
    if not cam_uri:
        if not recorded:
            raise ModelFileError(f"--irn {irn_uri} does not name the CAM model it was trained with; pass --cam")
        cam_uri = recorded
    cam_weights, cam_meta = _read_checked(cam_uri, options, "--cam", "cam")
    if list(cam_meta.get("vocabulary", [])) != list(irn_meta.get("vocabulary", [])):
        raise ModelFileError(
            f"the CAM model's classes {cam_meta.get('vocabulary')} differ from IRNet's {irn_meta.get('vocabulary')}"
        )
    cam_id = model_id(cam_weights)
    if recorded and normalize(recorded) != normalize(cam_uri):
        # IRNet was trained on the backbone of one particular CAM model: another one would
        # feed it features it never saw. Refuse when the recorded one is there and differs.
        try:
            other = model_id(read_bytes(join(recorded, MODEL_WEIGHTS), options))
        except StorageNotFound:
            other = cam_id  # moved or copied elsewhere: the given one stands
        if other != cam_id:
            raise ModelFileError(
                f"IRNet {irn_uri} was trained on the backbone of CAM model {recorded}, but --cam {cam_uri} holds other "
                "weights; pass the CAM model IRNet was trained with"
            )
    try:
        _build_pair(cam_weights, cam_meta, irn_weights, irn_meta)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"the models at {cam_uri} and {irn_uri} cannot be loaded together: {exc}") from None
    return ModelPair(
        cam_uri=cam_uri, irn_uri=irn_uri, cam_id=cam_id, irn_id=model_id(irn_weights),
        cam_created=cam_meta.get("created"), irn_created=irn_meta.get("created"),
        vocabulary=tuple(cam_meta["vocabulary"]),
    )  # fmt: skip


def load_model_pair(models: ModelPair, options: StorageOptions = StorageOptions()):
    """``(CamNet, IRNet)`` in eval mode on the CPU; raises if the weights changed since
    :func:`check_model_pair` checked them."""
    cam_weights, cam_meta = _read_checked(models.cam_uri, options, "--cam", "cam")
    irn_weights, irn_meta = _read_checked(models.irn_uri, options, "--irn", "irn")
    for kind, weights, expected in (("CAM", cam_weights, models.cam_id), ("IRNet", irn_weights, models.irn_id)):
        if model_id(weights) != expected:
            raise ModelFileError(f"the {kind} model's weights changed while the job ran (expected {expected})")
    return _build_pair(cam_weights, cam_meta, irn_weights, irn_meta)
