"""Batched inference (label_batch, infer_cams_batch) against the per-image reference functions."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage
import torch

import irnet_ray.inference as inference
from irnet_ray.config import BackboneConfig, CamInferenceConfig, SynthesisConfig
from irnet_ray.inference import (
    ImageTooLargeForDevice,
    bucket_key,
    image_tensor,
    infer_cams,
    infer_cams_batch,
    infer_image,
    label_batch,
    label_image,
)
from irnet_ray.models.cam import CamNet
from irnet_ray.models.irnet import IRNet
from irnet_ray.synthesis import (
    connected_components,
    instance_map,
    instances_from_segments,
    synthesize_labels,
    synthesize_labels_batch,
)

CAMS = CamInferenceConfig(scales=(1.0, 0.5))
WALK = SynthesisConfig(steps=16)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cam = CamNet(BackboneConfig(arch="resnet18"), 3).eval()
    irn = IRNet(cam.backbone.channels).eval()
    irn.mean_displacement.copy_(torch.tensor([0.3, -0.2]))
    return cam, irn


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """Blobs rather than noise, so CAMs, boundaries and displacements have some structure."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (3, height // 8 + 2, width // 8 + 2))
    fine = scipy.ndimage.zoom(coarse, (1, 8, 8), order=1)[:, :height, :width]
    return np.clip(fine.transpose(1, 2, 0) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def assert_same_labels(got, expected, semantic_agreement=0.999):
    assert got.semantic.shape == expected.semantic.shape
    assert (got.semantic == expected.semantic).mean() >= semantic_agreement
    np.testing.assert_array_equal(got.instance_map, expected.instance_map)
    assert len(got.instances) == len(expected.instances)
    np.testing.assert_array_equal(got.instances.classes, expected.instances.classes)
    np.testing.assert_allclose(got.instances.scores, expected.instances.scores, atol=1e-4)
    for a, b in zip(got.instances.masks, expected.instances.masks):
        union = (a | b).sum()
        assert union == 0 or (a & b).sum() / union >= 0.99


def test_same_size_batch_equals_label_image(models):
    cam, irn = models
    images = [smooth_image(seed, 96, 128) for seed in range(4)]
    classes = [[1], [2, 3], [1, 3], []]
    timings: dict[str, float] = {}
    batch = label_batch(cam, irn, images, classes, CAMS, WALK, timings)
    assert set(timings) >= {"inference", "walk", "instances", "synthesis"}
    assert timings["synthesis"] >= timings["walk"] + timings["instances"]
    assert sum(len(labels.instances) for labels, _ in batch) > 0  # something to compare
    for image, ids, (labels, inferred) in zip(images, classes, batch):
        expected, alone = label_image(cam, irn, image, ids, CAMS, WALK)
        assert_same_labels(labels, expected)
        torch.testing.assert_close(inferred.boundary, alone.boundary, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inferred.displacement, alone.displacement, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(inferred.cams.highres, alone.cams.highres, rtol=1e-4, atol=1e-5)


def test_bucket_rule():
    assert bucket_key(96, 128) == (96, 128)
    assert bucket_key(65, 97) == bucket_key(70, 101) == (96, 128)
    assert bucket_key(64, 64) == (64, 64) and bucket_key(1, 1) == (32, 32)
    assert bucket_key(70, 101, multiple=16) == (80, 112)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_key(10, 10, multiple=24)


@pytest.mark.parametrize("images_per_call", [100, 1], ids=["whole-bucket", "cpu-default"])
def test_mixed_sizes_follow_the_bucket_rule(models, monkeypatch, images_per_call):
    cam, irn = models
    # 100: every image of a bucket in one call, as on a GPU; 1: the CPU's one image per call.
    monkeypatch.setattr(inference, "CPU_IMAGES_PER_CALL", images_per_call)
    sizes = [(96, 128), (70, 101), (64, 64), (65, 97), (33, 50)]
    images = [smooth_image(seed, h, w) for seed, (h, w) in enumerate(sizes)]
    classes = [[1], [2], [3], [1, 2], [2]]
    backbone_inputs = []
    forward = cam.backbone.forward
    monkeypatch.setattr(cam.backbone, "forward", lambda x: backbone_inputs.append(tuple(x.shape)) or forward(x))
    batch = label_batch(cam, irn, images, classes, CAMS, WALK)
    # buckets: 96 x 128 holds images 0, 1, 3; 64 x 64 holds images 2 and 4 (33 x 50); image and
    # mirror image always in the same call, on the bucket's canvas
    if images_per_call > 1:  # one backbone call per scale and bucket
        expected = [(6, 3, 96, 128), (6, 3, 48, 64), (4, 3, 64, 64), (4, 3, 32, 32)]
    else:  # one call per scale and image
        expected = [(2, 3, 96, 128)] * 3 + [(2, 3, 48, 64)] * 3 + [(2, 3, 64, 64)] * 2 + [(2, 3, 32, 32)] * 2
    assert sorted(backbone_inputs) == sorted(expected)
    monkeypatch.undo()
    for n, (size, ids, (labels, inferred)) in enumerate(zip(sizes, classes, batch)):
        assert labels.semantic.shape == size and inferred.boundary.shape == (-(-size[0] // 4), -(-size[1] // 4))
        alone, alone_inference = label_batch(cam, irn, [images[n]], [ids], CAMS, WALK)[0]
        assert_same_labels(labels, alone)
        torch.testing.assert_close(inferred.boundary, alone_inference.boundary, rtol=1e-4, atol=1e-5)
    # an image whose sides are multiples of the bucket multiple is not padded: per-image result
    assert_same_labels(batch[0][0], label_image(cam, irn, images[0], classes[0], CAMS, WALK)[0])
    # uint8 (3, H, W) tensors are accepted too
    as_tensor = label_batch(cam, irn, [torch.from_numpy(images[2]).permute(2, 0, 1)], [classes[2]], CAMS, WALK)
    assert_same_labels(as_tensor[0][0], batch[2][0])


def test_bad_inputs_name_the_image(models):
    cam, irn = models
    good = smooth_image(0, 32, 32)
    with pytest.raises(ValueError, match="image 1: class ids"):
        label_batch(cam, irn, [good, good], [[1], [4]])
    with pytest.raises(ValueError, match="image 2 must be"):
        label_batch(cam, irn, [good, good, good.astype(np.float32)], [[1], [1], [1]])
    with pytest.raises(ValueError, match="image 0 must be"):
        infer_cams_batch(cam, [good[..., :2]], [[1]])
    assert label_batch(cam, irn, [], []) == [] and infer_cams_batch(cam, [], []) == []


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (32, 32), (5, 40), (40, 3)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.55, 0.8, 1.0])
def test_torch_connected_components_equal_scipy(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    masks = rng.random((3, *shape)) < density
    got = connected_components(torch.from_numpy(masks), method="torch", check_every=2)
    for mask, ids in zip(masks, got.numpy()):
        expected, _ = scipy.ndimage.label(mask)
        np.testing.assert_array_equal(ids, expected)  # same partition and the same numbering
    # equal-value components of a label map: each value's components, numbered together in raster order
    labels = rng.integers(0, 4, (2, *shape))
    got = connected_components(torch.from_numpy(labels), method="torch").numpy()
    np.testing.assert_array_equal(got, connected_components(torch.from_numpy(labels), method="scipy").numpy())
    for label_map, ids in zip(labels, got):
        for value in range(1, 4):
            expected, count = scipy.ndimage.label(label_map == value)
            own = ids[label_map == value]
            assert len(np.unique(own)) == count
            # same partition: one id per scipy component and vice versa
            pairs = np.unique(np.stack([expected[label_map == value], own]), axis=1)
            assert pairs.shape[1] == count
        first = [np.flatnonzero(ids.ravel() == k)[0] for k in range(1, ids.max() + 1)]
        assert first == sorted(first)


def test_spiral_needs_many_iterations():
    # A one-pixel-wide spiral: labels must travel far, the convergence test must not stop early.
    mask = np.zeros((21, 21), bool)
    top, left, bottom, right = 0, 0, 20, 20
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        mask[bottom, left : right + 1] = True
        mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    got = connected_components(torch.from_numpy(mask[None]), method="torch", check_every=1)[0].numpy()
    np.testing.assert_array_equal(got, scipy.ndimage.label(mask)[0])


def squares_field(sides, height=40, width=48):
    """Displacement field of square objects (sides in stride-4 pixels) pointing at their centres."""
    labels = np.zeros((height, width), np.int32)
    field = np.zeros((2, height, width), np.float32)
    field[0], field[1] = height, width  # background lands in the empty bottom-right corner (no candidate)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = 1, 1
    for k, side in enumerate(sides, start=1):
        if x + side >= width:
            y, x = y + max(sides) + 1, 1
        labels[y : y + side, x : x + side] = k
        cy, cx = y + (side - 1) / 2, x + (side - 1) / 2
        inside = labels == k
        field[0][inside] = (cy - ys)[inside]
        field[1][inside] = (cx - xs)[inside]
        x += side + 1
    return field, labels


def test_group_and_instance_caps_keep_the_largest_and_best():
    sides = [3, 7, 4, 8, 5, 6, 2, 9]
    field, labels = squares_field(sides)
    uncapped = instance_map(field, iterations=20)
    assert uncapped.max() == len(sides)
    capped = instance_map(field, iterations=20, max_groups=3)
    assert capped.max() == 3
    kept = {int(np.unique(labels[capped == g])[0]) for g in (1, 2, 3)}
    assert kept == {8, 4, 2}  # the objects of sides 9, 8, 7
    config = SynthesisConfig(steps=4, displacement_iterations=20, max_groups=3, max_instances=2)
    device_map = synthesize_labels_batch(
        [torch.ones(1, *labels.shape)], [torch.tensor([2])], [torch.zeros(labels.shape)], [torch.from_numpy(field)],
        [(160, 192)], config,
    )[0].instance_map  # fmt: skip
    np.testing.assert_array_equal(device_map, capped)
    # instances: the two best scores stay, in their original order
    scores = np.array([[0.2, 0.9], [0.5, 0.7]], np.float32).repeat(4, axis=0).repeat(4, axis=1)
    segments = np.zeros((8, 8), np.int64)
    segments[0:2, 0:2] = segments[0:2, 4:6] = 1  # two components of segment 1
    segments[4:6, 0:2] = segments[4:6, 4:6] = 2
    everything = instances_from_segments(scores[None].repeat(2, 0), segments, np.array([1, 2]), 0)
    assert len(everything) == 4
    best = instances_from_segments(scores[None].repeat(2, 0), segments, np.array([1, 2]), 0, max_instances=2)
    np.testing.assert_allclose(best.scores, [0.9, 0.7])
    np.testing.assert_array_equal(best.masks, everything.masks[[1, 3]])


@pytest.mark.parametrize("method", ["auto", "torch"])  # CPU: scipy components, or the device code
def test_capped_batch_synthesis_equals_the_reference(method):
    field, labels = squares_field([3, 7, 4, 8, 5, 6, 2, 9])
    cams = torch.from_numpy(np.stack([(labels % 2 == 1) * 0.8, (labels % 2 == 0) * (labels > 0) * 1.0])).float()
    boundary = torch.from_numpy(scipy.ndimage.morphological_gradient(labels, size=2) > 0).float() * 0.9
    size = (158, 190)  # stride-4 grid 40 x 48
    for config in [SynthesisConfig(steps=32), SynthesisConfig(steps=32, max_groups=3, max_instances=4)]:
        expected = synthesize_labels(cams, [1, 3], boundary, field, size, config)
        got = synthesize_labels_batch([cams], [torch.tensor([1, 3])], [boundary], [torch.from_numpy(field)], [size],
                                      config, components_method=method)[0]
        assert_same_labels(got, expected, semantic_agreement=1.0)
        assert len(got.instances) <= config.max_instances
    assert len(got.instances) == 4 and got.instance_map.max() == 3


def test_out_of_memory_halves_the_bucket_then_names_the_image(models, monkeypatch):
    cam, irn = models
    monkeypatch.setattr(inference, "CPU_IMAGES_PER_CALL", 100)  # whole buckets per call, as on a GPU
    images = [smooth_image(seed, 64, 64) for seed in range(4)]
    classes = [[1], [2], [3], [1]]
    expected = label_batch(cam, irn, images, classes, CAMS, WALK)
    forward = cam.backbone.forward
    calls = []

    def small_batches_only(x):
        calls.append(x.shape[0])
        if x.shape[0] > 2:  # the image and its mirror image of one image fit, nothing more
            raise torch.OutOfMemoryError("injected")
        return forward(x)

    monkeypatch.setattr(cam.backbone, "forward", small_batches_only)
    got = label_batch(cam, irn, images, classes, CAMS, WALK)
    assert [c for c in calls if c > 2] == [8, 4, 4]  # the bucket, then each half, then single images
    for (a, _), (b, _) in zip(got, expected):
        assert_same_labels(a, b)
    monkeypatch.setattr(cam.backbone, "forward", lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    with pytest.raises(ImageTooLargeForDevice, match="image 0 .64x64.") as raised:
        label_batch(cam, irn, images[:1], classes[:1], CAMS, WALK)
    assert raised.value.index == 0 and raised.value.stage == "inference"
    monkeypatch.undo()
    # synthesis too: halves of the batch
    synthesize = inference.synthesize_labels_batch
    sizes = []

    def one_at_a_time(cams, *args, **kwargs):
        sizes.append(len(cams))
        if len(cams) > 1:
            raise torch.cuda.OutOfMemoryError("injected")
        return synthesize(cams, *args, **kwargs)

    monkeypatch.setattr(inference, "synthesize_labels_batch", one_at_a_time)
    got = label_batch(cam, irn, images, classes, CAMS, WALK)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    for (a, _), (b, _) in zip(got, expected):
        assert_same_labels(a, b)


def test_boundary_is_flip_averaged_as_the_reference(models):
    cam, irn = models
    image = smooth_image(7, 64, 96)
    normalized = image_tensor(image)[None]
    with torch.no_grad():
        plain = irn(cam.backbone(normalized), subtract_mean=True)
        mirrored = irn(cam.backbone(normalized.flip(-1)), subtract_mean=True)
    # sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2), written from the forward pass's probabilities
    logits = torch.logit(plain.boundary[0].double()), torch.logit(mirrored.boundary[0].double()).flip(-1)
    averaged = torch.sigmoid(logits[0] / 2 + logits[1] / 2).float()
    assert (averaged - plain.boundary[0]).abs().max() > 1e-3  # the flip matters on this image
    per_image = infer_image(cam, irn, image, [1], CAMS)
    batched = label_batch(cam, irn, [image, image], [[1], [2]], CAMS, WALK)
    for boundary in (per_image.boundary, batched[0][1].boundary, batched[1][1].boundary):
        torch.testing.assert_close(boundary, averaged, rtol=1e-4, atol=1e-5)
    for output in (per_image, batched[0][1]):  # the displacement is the unflipped image's
        torch.testing.assert_close(output.displacement, plain.displacement[0], rtol=1e-4, atol=1e-4)
    unflipped = dataclasses.replace(CAMS, boundary_flip=False)
    torch.testing.assert_close(infer_image(cam, irn, image, [1], unflipped).boundary, plain.boundary[0])
    off = label_batch(cam, irn, [image], [[1]], unflipped, WALK)[0][1]
    torch.testing.assert_close(off.boundary, plain.boundary[0], rtol=1e-4, atol=1e-5)


def test_infer_cams_batch_equals_infer_cams(models):
    cam, _ = models
    sizes = [(64, 96), (64, 96), (32, 32), (64, 64)]
    images = [smooth_image(seed, h, w) for seed, (h, w) in enumerate(sizes)]
    classes = [[1, 2], [3], [2], [1, 2, 3]]
    config = CamInferenceConfig(scales=(1.0, 0.5, 1.5))
    batch = infer_cams_batch(cam, images, classes, config)
    for image, ids, got in zip(images, classes, batch):
        expected = infer_cams(cam, image, ids, config)
        np.testing.assert_array_equal(got.classes.numpy(), ids)
        torch.testing.assert_close(got.highres, expected.highres, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.strided, expected.strided, rtol=1e-4, atol=1e-5)


def test_block_diagonal_walk_equals_one_walk_per_image():
    # The accelerator path walks a batch as one block-diagonal matrix (the CPU walks image by
    # image): the same numbers for images of different sizes and numbers of score maps.
    from irnet_ray.synthesis import _walk_batch, _walk_block_diagonal

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 9, 11), (1, 16, 16), (5, 7, 20)]
    scores = [torch.rand(shape, generator=generator) for shape in shapes]
    boundaries = [torch.rand(shape[1:], generator=generator) for shape in shapes]
    together = _walk_block_diagonal(scores, boundaries, 5, 10.0, 20)
    alone = _walk_batch(scores, boundaries, 5, 10.0, 20)  # CPU tensors: one walk per image
    for joint, single, s in zip(together, alone, scores):
        assert joint.shape == s.shape
        torch.testing.assert_close(joint, single, rtol=1e-5, atol=1e-6)
