"""The bad-input corpus (tests/bad_inputs.py) through the decode path (decode_batch, called as a
plain function) and per-image inference (label_image with random-init ResNet-18 models): every
kind decodes to its outcome. No Ray cluster. The whole job on the corpus (every kind labeled or
an error row with its reason) is in tests/test_label.py."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import JOB_REASONS, KINDS, MIN_LABEL_SIDE, build_bad_input_corpus, corpus_records
from PIL import Image, UnidentifiedImageError

from irnet_ray.config import BackboneConfig, CamInferenceConfig, SynthesisConfig
from irnet_ray.data.decode import DECODE_REASONS, ImageDecodeError, decode_image
from irnet_ray.data.images import row_image
from irnet_ray.data.ray_datasets import decode_batch
from irnet_ray.data.sources import ClassVocabulary, ManifestError, read_manifest
from irnet_ray.inference import label_image
from irnet_ray.models.cam import CamNet
from irnet_ray.models.irnet import IRNet

#: The kinds issue 4 names; the corpus may hold more.
REQUIRED_KINDS = (
    "truncated_jpeg", "zero_bytes", "not_an_image", "grayscale", "cmyk", "rgba", "png16", "exif_rotated",
    "one_pixel", "huge", "no_classes", "duplicate", "missing", "normal",
)  # fmt: skip
WALK = SynthesisConfig(steps=16, displacement_iterations=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    manifest, names, expectations = build_bad_input_corpus(tmp_path_factory.mktemp("bad_inputs"))
    return manifest, names, expectations, corpus_records(manifest, names)


@pytest.fixture(scope="module")
def decoded(corpus):
    """decode_batch over every manifest row (duplicates included), at the original size."""
    records = corpus[3]
    batch = {
        "image_id": np.array([r.image_id for r in records], dtype=object),
        "uri": np.array([r.uri for r in records], dtype=object),
        "classes": [list(r.classes) for r in records],
    }
    out = decode_batch(batch, max_side=None)
    rows = [{name: out[name][i] for name in out} for i in range(len(records))]
    return list(zip(records, rows))


@pytest.fixture(scope="module")
def models(corpus):
    torch.manual_seed(0)
    cam = CamNet(BackboneConfig(arch="resnet18"), len(corpus[1])).eval()
    return cam, IRNet(cam.backbone.channels).eval()


def test_corpus_holds_every_kind_as_real_files(corpus):
    manifest, names, expectations, records = corpus
    assert set(REQUIRED_KINDS) <= set(expectations) == set(KINDS) and len(expectations) >= 13
    assert tuple(names) == tuple(sorted(names)) and len(set(names)) == len(names)
    files = {r.image_id: Path(r.uri) for r in records if r.image_id != "duplicate"}
    for image_id, outcome in expectations.items():
        assert outcome[0] in ("labeled", "error")
        if outcome[0] == "error":
            assert outcome[1] in DECODE_REASONS + JOB_REASONS + ("missing",), image_id
    data = {k: p.read_bytes() for k, p in files.items() if k != "missing"}
    assert not files["missing"].exists()
    assert data["zero_bytes"] == b""
    assert data["truncated_jpeg"][:2] == b"\xff\xd8" and b"\xff\xd9" not in data["truncated_jpeg"][-64:]
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(data["not_an_image"]))

    def opened(image_id):
        return Image.open(io.BytesIO(data[image_id]))

    assert opened("grayscale").mode == "L" and opened("cmyk").mode == "CMYK"
    rgba = opened("rgba")
    assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].min() == 0
    assert data["png16"][:8] == b"\x89PNG\r\n\x1a\n" and data["png16"][24] == 16  # IHDR bit depth
    exif = opened("exif_rotated")
    assert exif.getexif()[0x0112] == 6 and exif.size == (56, 32)  # stored wide, shown tall
    assert opened("one_pixel").size == (1, 1) and opened("huge").size == (4000, 4000)
    duplicates = [r for r in records if r.image_id == "duplicate"]
    assert len(duplicates) == 2 and duplicates[0].uri != duplicates[1].uri
    assert next(r for r in records if r.image_id == "no_classes").classes == ()
    assert len(manifest.read_text().splitlines()) == len(records) == len(KINDS) + 1


def test_decode_path_gives_each_kind_its_outcome(corpus, decoded):
    expectations = corpus[2]
    assert [r.image_id for r, _ in decoded] == [row["image_id"] for _, row in decoded]  # one row each, in order
    for record, row in decoded:
        status, expected = expectations[record.image_id]
        if status == "labeled":
            assert row["error"] == "", (record.image_id, row["error"])
            assert (row["height"], row["width"]) == expected, record.image_id
            assert len(row["image"]) == expected[0] * expected[1] * 3
            assert min(expected) >= 2 * MIN_LABEL_SIDE  # any min_side up to 32 keeps it
        elif expected in JOB_REASONS:
            # The decode layer lets these through; only the labeling job can reject them.
            assert row["error"] == "" and row["height"] > 0, record.image_id
        else:
            assert row["error"].startswith(f"{expected}: "), (record.image_id, row["error"])
            assert len(row["error"]) > len(expected) + 10  # a message, not just the code
            assert row["image"] == b"" and row["height"] == row["width"] == 0
    # The 1x1 image is what decode_image(min_side=...) calls too small.
    one_pixel = Path(next(r.uri for r, _ in decoded if r.image_id == "one_pixel")).read_bytes()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(one_pixel, min_side=MIN_LABEL_SIDE)
    assert info.value.reason == "too_small"


def test_decoded_pixels_are_converted_not_just_sized(decoded):
    images = {r.image_id: row_image(row) for r, row in decoded if row["error"] == "" and r.image_id != "duplicate"}
    gray = images["grayscale"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(gray[..., 0], (np.add.outer(np.arange(40), np.arange(56)) * 2 % 256))
    assert (images["rgba"][:, :20] == 255).all()  # transparent pixels composited over white
    png16 = (np.add.outer(np.arange(44), np.arange(60)) * 600).astype(np.int64)
    np.testing.assert_array_equal(images["png16"][..., 0], (png16 * 255 + 32767) // 65535)
    rotated = images["exif_rotated"]  # stored left red / right blue, turned clockwise: top red
    assert rotated[10, 16, 0] > 180 and rotated[10, 16, 2] < 80
    assert rotated[45, 16, 2] > 180 and rotated[45, 16, 0] < 80
    cmyk = images["cmyk"].astype(int)
    assert cmyk.std(axis=(0, 1)).max() < 3 and cmyk[0, 0, 2] > cmyk[0, 0, 0]  # flat, bluish (cyan + magenta ink)
    assert (images["huge"] == (70, 130, 180)).all()


# The outcome of every kind through the labeling job itself (the repeated id refused on both
# rows, never first-wins) is checked by
# tests/test_label.py::test_the_bad_input_corpus_ends_labeled_or_in_errors_with_its_reason.


def test_label_image_does_not_reject_what_the_job_must(corpus, decoded, models):
    """Why the job needs its own checks: inference runs on these and returns a complete-looking
    result (an all-background mask; a 1x1 label) instead of failing."""
    images = {r.image_id: row_image(row) for r, row in decoded if r.image_id in ("no_classes", "one_pixel")}
    labels, _ = label_image(*models, images["no_classes"], [], CamInferenceConfig(), WALK)
    assert labels.semantic.shape == (40, 40) and not labels.semantic.any() and len(labels.instances) == 0
    labels, _ = label_image(*models, images["one_pixel"], [1], CamInferenceConfig(), WALK)
    assert labels.semantic.shape == (1, 1)


def test_read_manifest_refuses_the_whole_file_for_one_duplicate_id(corpus, tmp_path):
    """The sources gap the docstring flags: one duplicate id fails the whole manifest today.
    Without it the manifest reads, and keeps the missing file and the empty class list."""
    manifest, names, _, records = corpus
    vocabulary = ClassVocabulary(tuple(names))
    with pytest.raises(ManifestError, match="duplicate image id 'duplicate'"):
        read_manifest(str(manifest), vocabulary=vocabulary)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    kept = [row for row in rows if row["image_id"] != "duplicate"]
    (manifest.parent / "no_duplicates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    read, _ = read_manifest(str(manifest.parent / "no_duplicates.jsonl"), vocabulary=vocabulary)
    expected = [(r.image_id, r.uri, r.classes) for r in records if r.image_id != "duplicate"]
    assert [(r.image_id, r.uri, r.classes) for r in read] == expected
