import pytest
import torch
from torch import nn

from irnet_ray.config import BackboneConfig, CamInferenceConfig
from irnet_ray.models.backbone import Backbone
from irnet_ray.models.cam import CamNet, cam_semantic_labels, multiscale_cams
from irnet_ray.models.irnet import IRNet


@pytest.mark.parametrize("arch,channels", [
    ("resnet18", (64, 64, 128, 256, 512)),
    ("resnet34", (64, 64, 128, 256, 512)),
    ("resnet50", (64, 256, 512, 1024, 2048)),
    ("resnet101", (64, 256, 512, 1024, 2048)),
])
def test_backbone_output_strides(arch, channels):
    backbone = Backbone(BackboneConfig(arch=arch)).eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 96, 128))
    assert backbone.channels == channels
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 96 // s, 128 // s) for c, s in zip(channels, (4, 4, 8, 16, 16))
    ]


def test_frozen_batchnorm_stays_in_eval_and_untrained_stages_have_no_grad():
    backbone = Backbone(BackboneConfig(arch="resnet18", frozen_batchnorm=True, first_trainable_stage=3)).train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert not any(p.requires_grad for p in backbone.stages[2].parameters())
    assert all(p.requires_grad for n, p in backbone.stages[3].named_parameters() if ".bn" not in n and "downsample.1" not in n)
    before = bns[0].running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bns[0].running_mean)


def test_backbone_loads_a_local_weights_file(tmp_path):
    source = Backbone(BackboneConfig(arch="resnet18"))
    import torchvision
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    loaded = Backbone(BackboneConfig(arch="resnet18", weights=str(path)))
    assert torch.equal(loaded.stages[0][0].weight, reference.conv1.weight)
    assert not torch.equal(source.stages[0][0].weight, reference.conv1.weight)


def test_backbone_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        Backbone(BackboneConfig(arch="vgg16"))
    with pytest.raises(ValueError, match="unknown weights"):
        Backbone(BackboneConfig(arch="resnet18", weights="NOT_A_WEIGHT"))
    with pytest.raises(FileNotFoundError, match="not found"):
        Backbone(BackboneConfig(arch="resnet18", weights=str(tmp_path / "missing.pth")))


def test_multiscale_cams_shapes_normalisation_and_classes():
    torch.manual_seed(0)
    model = CamNet(BackboneConfig(arch="resnet18"), num_classes=5).eval()
    image = torch.randn(3, 70, 90)
    out = multiscale_cams(model, image, torch.tensor([2, 5]), CamInferenceConfig(scales=(1.0, 0.5)))
    assert out.strided.shape == (2, 18, 23) and out.highres.shape == (2, 70, 90)
    assert (out.strided >= 0).all() and out.strided.amax(dim=(1, 2)).allclose(torch.ones(2), atol=1e-3)
    labels = cam_semantic_labels(out.highres, out.classes, 0.15)
    assert set(labels.unique().tolist()) <= {0, 2, 5}
    # the flipped view is folded back: a mirrored image gives mirrored CAMs (on a size where
    # the stride-16 grid is itself symmetric)
    image = torch.randn(3, 64, 96)
    mirrored = multiscale_cams(model, image.flip(-1), torch.tensor([2, 5]), CamInferenceConfig(scales=(1.0, 0.5)))
    plain = multiscale_cams(model, image, torch.tensor([2, 5]), CamInferenceConfig(scales=(1.0, 0.5)))
    assert torch.allclose(mirrored.highres.flip(-1), plain.highres, atol=1e-4)
    with pytest.raises(ValueError, match="class ids"):
        multiscale_cams(model, image, torch.tensor([0]))


def test_shared_backbone_pass_gives_the_same_cams():
    torch.manual_seed(0)
    model = CamNet(BackboneConfig(arch="resnet18"), num_classes=3).eval()
    image = torch.randn(3, 64, 64)
    with torch.no_grad():
        features = model.backbone(image[None])[-1]
    a = multiscale_cams(model, image, torch.tensor([1, 3]), CamInferenceConfig(scales=(1.0, 0.5)))
    b = multiscale_cams(model, image, torch.tensor([1, 3]), CamInferenceConfig(scales=(1.0, 0.5)), scale_one_features=features)
    assert torch.allclose(a.strided, b.strided, atol=1e-5)


def test_irnet_outputs_at_stride_four():
    backbone = Backbone(BackboneConfig(arch="resnet18")).eval()
    irnet = IRNet(backbone.channels).eval()
    irnet.mean_displacement.copy_(torch.tensor([0.5, -1.0]))
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 96, 64))
        raw = irnet(features, subtract_mean=False)
        corrected = irnet(features)
    assert raw.boundary.shape == (2, 24, 16) and raw.displacement.shape == (2, 2, 24, 16)
    assert ((raw.boundary >= 0) & (raw.boundary <= 1)).all()
    assert torch.allclose(raw.displacement - corrected.displacement, torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))


def test_a_random_backbone_with_frozen_parts_is_refused():
    """The paper's frozen stages and BatchNorm suit pretrained weights; on random weights they
    train ~nothing, so training refuses them (before Ray starts) and says what to pass."""
    from irnet_ray.data.sources import ClassVocabulary, ImageRecord
    from irnet_ray.train.ray_train import RunOptions, train_cam_job

    for frozen in (BackboneConfig(arch="resnet18"), BackboneConfig(arch="resnet18", frozen_batchnorm=False),
                   BackboneConfig(arch="resnet18", first_trainable_stage=0)):  # fmt: skip
        with pytest.raises(ValueError, match="no pretrained weights.*--weights.*--from-scratch"):
            train_cam_job([ImageRecord("a", "/nowhere/a.png", (1,))], ClassVocabulary(("cat",)), backbone=frozen,
                          run=RunOptions("r", "/nowhere/runs"))  # fmt: skip
    BackboneConfig.from_scratch("resnet18").check_trainable()
    BackboneConfig(arch="resnet18", weights="IMAGENET1K_V1").check_trainable()
    scratch = BackboneConfig.from_scratch("resnet18")
    assert (scratch.weights, scratch.frozen_batchnorm, scratch.first_trainable_stage) == (None, False, 0)
