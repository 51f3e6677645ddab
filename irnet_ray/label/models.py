"""The two trained models a labeling job uses: checked once by the driver, loaded once per actor.

A model's id is ``sha256:<hex>`` of its ``model.pt`` bytes: labels record the ids of the
weights that made them (a folder's URI can be reused for other weights), and every actor
checks that the weights it loaded are the ones the driver checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from irnet_ray.data.storage import StorageNotFound, StorageOptions, join, normalize, read_bytes
from irnet_ray.train import checkpoint as ckpt

from .output import LabelJobError

__all__ = ["LabelModels", "model_id", "check_models", "load_models"]


@dataclass(frozen=True)
class LabelModels:
    """Where the models are, which weights they hold, and what they were trained on."""

    cam_uri: str
    irn_uri: str
    cam_id: str
    irn_id: str
    cam_created: str | None
    irn_created: str | None
    vocabulary: tuple[str, ...]

    def record(self) -> dict:
        """The models as recorded in ``_job.json`` and the manifest."""
        return {
            "cam": {"uri": self.cam_uri, "id": self.cam_id, "created": self.cam_created},
            "irn": {"uri": self.irn_uri, "id": self.irn_id, "created": self.irn_created},
        }


def model_id(weights: bytes) -> str:
    return "sha256:" + hashlib.sha256(weights).hexdigest()


def _read(uri: str, options: StorageOptions, flag: str) -> tuple[bytes, dict]:
    try:
        meta = json.loads(read_bytes(join(uri, ckpt.MODEL_META), options).decode("utf-8"))
        weights = read_bytes(join(uri, ckpt.MODEL_WEIGHTS), options)
    except StorageNotFound:
        raise LabelJobError(
            f"{flag} {uri}: no model there (expected {ckpt.MODEL_META} and {ckpt.MODEL_WEIGHTS} from irnet-ray training)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelJobError(f"{flag} {uri}: {ckpt.MODEL_META} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in ckpt.MODEL_KINDS:
        raise LabelJobError(f"{flag} {uri}: {ckpt.MODEL_META} is not an irnet-ray model description")
    return weights, meta


def _build(cam_weights: bytes, cam_meta: dict, irn_weights: bytes, irn_meta: dict):
    cam = ckpt.build_cam_model(ckpt.state_dict_from_bytes(cam_weights), cam_meta)
    irn = ckpt.build_irn_model(ckpt.state_dict_from_bytes(irn_weights), irn_meta, cam.backbone.channels)
    return cam, irn


def check_models(cam_uri: str | None, irn_uri: str, options: StorageOptions) -> LabelModels:
    """Read and build both models once (user mistakes fail here, before any work starts).

    ``cam_uri`` ``None``: the CAM model IRNet was trained with (recorded in its metadata).
    """
    irn_weights, irn_meta = _read(irn_uri, options, "--irn")
    if irn_meta["kind"] != "irn":
        raise LabelJobError(f"--irn {irn_uri} holds a {irn_meta['kind']!r} model, expected an IRNet ('irn') model")
    recorded = (irn_meta.get("config") or {}).get("cam_model")
    if not cam_uri:
        if not recorded:
            raise LabelJobError(f"--irn {irn_uri} does not name the CAM model it was trained with; pass --cam")
        cam_uri = recorded
    cam_weights, cam_meta = _read(cam_uri, options, "--cam")
    if cam_meta["kind"] != "cam":
        raise LabelJobError(f"--cam {cam_uri} holds a {cam_meta['kind']!r} model, expected a CAM ('cam') model")
    if list(cam_meta.get("vocabulary", [])) != list(irn_meta.get("vocabulary", [])):
        raise LabelJobError(
            f"the CAM model's classes {cam_meta.get('vocabulary')} differ from IRNet's {irn_meta.get('vocabulary')}"
        )
    cam_id = model_id(cam_weights)
    if recorded and normalize(recorded) != normalize(cam_uri):
        # IRNet was trained on the backbone of one particular CAM model: another one would
        # feed it features it never saw. Refuse when the recorded one is there and differs.
        try:
            other = model_id(read_bytes(join(recorded, ckpt.MODEL_WEIGHTS), options))
        except StorageNotFound:
            other = cam_id  # moved or copied elsewhere: the given one stands
        if other != cam_id:
            raise LabelJobError(
                f"IRNet {irn_uri} was trained on the backbone of CAM model {recorded}, but --cam {cam_uri} holds other "
                "weights; pass the CAM model IRNet was trained with"
            )
    try:
        _build(cam_weights, cam_meta, irn_weights, irn_meta)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise LabelJobError(f"the models at {cam_uri} and {irn_uri} cannot be loaded together: {exc}") from None
    return LabelModels(
        cam_uri=cam_uri, irn_uri=irn_uri, cam_id=cam_id, irn_id=model_id(irn_weights),
        cam_created=cam_meta.get("created"), irn_created=irn_meta.get("created"),
        vocabulary=tuple(cam_meta["vocabulary"]),
    )  # fmt: skip


def load_models(models: LabelModels, options: StorageOptions):
    """``(CamNet, IRNet)`` in eval mode on the CPU; raises if the weights changed since the
    driver checked them."""
    cam_weights, cam_meta = _read(models.cam_uri, options, "--cam")
    irn_weights, irn_meta = _read(models.irn_uri, options, "--irn")
    for kind, weights, expected in (("CAM", cam_weights, models.cam_id), ("IRNet", irn_weights, models.irn_id)):
        if model_id(weights) != expected:
            raise LabelJobError(f"the {kind} model's weights changed while the job ran (expected {expected})")
    return _build(cam_weights, cam_meta, irn_weights, irn_meta)
