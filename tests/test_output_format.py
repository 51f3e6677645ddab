"""The pseudo-mask output format: rows round-trip through Parquet and decode with plain
pyarrow, pycocotools and Pillow (what docs/output-format.md tells readers to use)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from irnet_ray.data import output_format as of

NAMES = ("cat", "dog", "bird")


def _labels(height: int, width: int):
    semantic = np.zeros((height, width), np.uint8)
    semantic[2:10, 3:12] = 1
    semantic[12:20, 1:6] = 3
    masks = np.zeros((2, height, width), bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 12:20, 1:6] = True
    return semantic, masks, np.array([1, 3]), np.array([0.9, 0.4], np.float32)


def _row(size, semantic, masks, classes, scores):
    return of.encode_label_row(
        image_id="img-1", uri="s3://b/img-1.jpg", size=size, classes=[3, 1, 1], class_names=NAMES,
        semantic=semantic, instance_masks=masks, instance_classes=classes, instance_scores=scores,
        run_id="r1", cam_model_id="sha256:a", irn_model_id="sha256:b", config_id="sha256:c",
    )  # fmt: skip


def test_voc_palette_matches_the_pascal_colours():
    palette = of.voc_palette()
    assert palette.shape == (256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # VOC's ignore colour
    assert len({tuple(c) for c in palette[:21]}) == 21


def test_resize_nearest_inverts_an_integer_downscale_and_keeps_values():
    small = np.arange(12, dtype=np.uint8).reshape(3, 4)
    big = of.resize_nearest(small, (9, 8))
    assert big.shape == (9, 8)
    assert np.array_equal(big, np.repeat(np.repeat(small, 3, axis=0), 2, axis=1))
    stack = np.stack([small == 5, small == 6])
    assert of.resize_nearest(stack, (9, 8)).shape == (2, 9, 8)
    assert of.resize_nearest(small, (3, 4)) is small
    odd = of.resize_nearest(small, (7, 13))
    assert set(np.unique(odd)) <= set(np.unique(small))


def test_label_row_round_trips_through_parquet_and_pycocotools(tmp_path):
    semantic, masks, classes, scores = _labels(24, 16)
    row = _row((24, 16), semantic, masks, classes, scores)
    assert row["classes"] == [1, 3] and row["class_names"] == ["cat", "bird"]
    path = tmp_path / "labels.parquet"
    pq.write_table(of.labels_table([row]), path)

    table = pq.read_table(path)
    assert table.schema.equals(of.LABEL_SCHEMA)
    back = table.to_pylist()[0]
    assert (back["height"], back["width"]) == (24, 16)
    png = Image.open(io.BytesIO(back["semantic_png"]))
    assert png.mode == "P" and png.size == (16, 24)
    assert np.array_equal(np.asarray(png), semantic)  # pixel values are class ids
    assert np.array_equal(of.decode_semantic(back["semantic_png"]), semantic)
    for instance, mask, class_id, score in zip(back["instances"], masks, classes, scores):
        decoded = mask_utils.decode({"size": instance["rle"]["size"], "counts": instance["rle"]["counts"]})
        assert decoded.shape == (24, 16)
        assert np.array_equal(decoded.astype(bool), mask)
        assert instance["class_id"] == class_id and instance["class_name"] == NAMES[class_id - 1]
        assert instance["score"] == pytest.approx(float(score))
        assert instance["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        assert instance["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    decoded_masks, decoded_classes, decoded_scores = of.decode_instances(back)
    assert decoded_scores.tolist() == pytest.approx([0.9, 0.4])
    assert np.array_equal(decoded_masks, masks) and decoded_classes.tolist() == [1, 3]


def test_labels_at_a_smaller_size_come_back_at_the_original_size():
    semantic, masks, classes, scores = _labels(24, 16)
    row = _row((48, 32), semantic, masks, classes, scores)  # original twice the labeling size
    assert (row["label_height"], row["label_width"]) == (24, 16)
    assert of.decode_semantic(row["semantic_png"]).shape == (48, 32)
    big, _, _ = of.decode_instances(row)
    assert big.shape == (2, 48, 32)
    assert np.array_equal(big[:, ::2, ::2], masks)
    assert [i["area"] for i in row["instances"]] == [int(m.sum()) * 4 for m in masks]


def test_an_image_without_instances_has_an_empty_list():
    semantic = np.zeros((8, 8), np.uint8)
    row = _row((8, 8), semantic, np.zeros((0, 8, 8), bool), [], [])
    assert row["instances"] == []
    table = of.labels_table([row])
    assert table.column("instances").to_pylist() == [[]]


def test_bad_label_inputs_are_refused():
    semantic, masks, classes, scores = _labels(24, 16)
    with pytest.raises(ValueError, match="instance masks"):
        _row((24, 16), semantic, masks[:, :10], classes, scores)
    with pytest.raises(ValueError, match="differ in number"):
        _row((24, 16), semantic, masks, classes[:1], scores)
    with pytest.raises(ValueError, match="unknown error reason"):
        of.error_row(image_id="x", uri="u", classes=[], stage="decode", reason="oops", message="m", run_id="r")


def test_error_rows_table():
    row = of.error_row(image_id="x", uri="s3://b/x.jpg", classes=[2], stage="decode", reason="truncated",
                       message="truncated JPEG\n data", run_id="r1")  # fmt: skip
    assert row["message"] == "truncated JPEG data" and row["occurrence"] == 0
    table = of.errors_table([row])
    assert table.schema.equals(of.ERROR_SCHEMA)
    assert table.to_pylist() == [row]
    assert set(of.INPUT_REASONS) <= set(of.ERROR_REASONS) and "label_failed" in of.ERROR_REASONS
