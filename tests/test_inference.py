"""One shared backbone pass for CAM and IRNet gives exactly what separate passes give."""

import numpy as np
import pytest
import torch

from irnet_ray.config import BackboneConfig, CamInferenceConfig, SynthesisConfig
from irnet_ray.inference import image_tensor, infer_cams, infer_image, label_image
from irnet_ray.models.cam import CamNet, multiscale_cams
from irnet_ray.models.irnet import IRNet, crop_to_image


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cam = CamNet(BackboneConfig(arch="resnet18"), 3).eval()
    return cam, IRNet(cam.backbone.channels).eval()


@pytest.mark.parametrize("size", [(64, 64), (70, 101), (33, 50), (17, 17)])
def test_shared_pass_matches_separate_passes(models, size):
    cam, irn = models
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    # The unflipped boundary is what one separate IRNet pass gives (the flip-averaged default is
    # tested in test_label_batch.py).
    config = CamInferenceConfig(scales=(1.0, 0.5), boundary_flip=False)
    shared = infer_image(cam, irn, image, [1, 3], config)
    alone = multiscale_cams(cam, image_tensor(image), torch.tensor([1, 3]), config)
    torch.testing.assert_close(shared.cams.strided, alone.strided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.cams.highres, alone.highres, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        separate = crop_to_image(irn(cam.backbone(image_tensor(image)[None]), subtract_mean=True), *size)
    torch.testing.assert_close(shared.boundary, separate.boundary[0])
    torch.testing.assert_close(shared.displacement, separate.displacement[0])
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    assert shared.boundary.shape == (h, w) and shared.displacement.shape == (2, h, w)
    torch.testing.assert_close(infer_cams(cam, image, [1, 3], config).strided, alone.strided)


def test_label_image_sizes_and_no_classes(models):
    cam, irn = models
    image = np.random.default_rng(2).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    image.setflags(write=False)  # as Pillow hands them out
    labels, inference = label_image(cam, irn, image, [2], synthesis_config=SynthesisConfig(steps=8))
    assert labels.semantic.shape == (40, 52) and set(np.unique(labels.semantic)) <= {0, 2}
    assert labels.instances.masks.shape[1:] == (40, 52)
    empty, _ = label_image(cam, irn, image, [], synthesis_config=SynthesisConfig(steps=8))
    assert not empty.semantic.any() and len(empty.instances) == 0
    with pytest.raises(ValueError, match="uint8"):
        image_tensor(image.astype(np.float32))
