"""Downstream readers and exports (irnet_ray.downstream) on a hand-made labeling output.

The output is written directly with the library's own row encoder and Parquet writer (no Ray
labeling job): 3 images of 64 x 64 in two data files, with known instances, scores and a
score-0 fragment, so every expected box, label and pixel is known.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from irnet_ray.cli import main
from irnet_ray.data import output_format as of
from irnet_ray.data.parquet_files import write_table
from irnet_ray.data.storage import StorageOptions, join, write_bytes
from irnet_ray.downstream import export as export_module
from irnet_ray.downstream.export import (
    EXPORT_MARKER,
    ExportError,
    export_coco,
    export_voc,
    image_id_from_voc_name,
    voc_name,
)
from irnet_ray.downstream.readers import (
    LabelDataset,
    LabelRunError,
    detection_collate,
    instance_targets,
    label_dataset_ray,
    open_labels,
    semantic_target,
)

VOCABULARY = ["cat", "dog"]
SIZE = 64
# image id -> instances as (class id, score, (row slice, column slice)); fragments included
INSTANCES = {
    "a": [(1, 0.9, (slice(8, 24), slice(10, 30))), (2, 0.7, (slice(30, 50), slice(35, 60))),
          (1, 0.0, (slice(60, 62), slice(0, 2)))],  # the score-0 fragment: 4 px
    "cls/b": [(2, 0.8, (slice(5, 41), slice(5, 41))), (1, 0.5, (slice(55, 57), slice(50, 55)))],  # 10 px: min_area
    "c": [],
}  # fmt: skip
FILES = [["a", "cls/b"], ["c"]]  # two committed data files


def _semantic(image_id: str) -> np.ndarray:
    semantic = np.zeros((SIZE, SIZE), np.uint8)
    for class_id, _, region in INSTANCES[image_id]:
        semantic[region] = class_id
    return semantic


def _image(image_id: str) -> np.ndarray:
    seed = sum(map(ord, image_id))
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image_id: str, uri: str, class_names=VOCABULARY, instances=None) -> dict:
    instances = INSTANCES[image_id] if instances is None else instances
    masks = np.zeros((len(instances), SIZE, SIZE), bool)
    for n, (_, _, region) in enumerate(instances):
        masks[n][region] = True
    semantic = np.zeros((SIZE, SIZE), np.uint8)
    for class_id, _, region in instances:
        semantic[region] = class_id
    return of.encode_label_row(
        image_id=image_id, uri=uri, size=(SIZE, SIZE), classes=sorted({c for c, _, _ in instances}) or [1],
        class_names=class_names, semantic=semantic, instance_masks=masks,
        instance_classes=[c for c, _, _ in instances], instance_scores=[s for _, s, _ in instances],
        run_id="r1", cam_model_id="sha256:a", irn_model_id="sha256:b", config_id="sha256:c",
    )  # fmt: skip


def write_output(root: str, images_root: str, options: StorageOptions = StorageOptions(), *,
                 files=FILES, rows_of=None, manifest: bool = True) -> str:  # fmt: skip
    """A finished labeling output at ``root`` (local or s3://) with the images under
    ``images_root``; ``rows_of(image_id, uri)`` overrides the rows."""
    rows_of = rows_of or _row
    write_bytes(join(root, "_job.json"), json.dumps({"format": of.FORMAT_NAME, "vocabulary": VOCABULARY}).encode(),
                options)  # fmt: skip
    data_files = []
    for number, ids in enumerate(files):
        rows = []
        for image_id in ids:
            uri = join(images_root, f"{image_id.replace('/', '_')}.png")
            write_bytes(uri, _png(_image(image_id)), options)
            rows.append(rows_of(image_id, uri))
        written = write_table(join(root, "data"), f"part-{number}.parquet", of.labels_table(rows), options)
        data_files.append({"path": f"data/part-{number}.parquet", "rows": written["rows"], "bytes": written["bytes"]})
    errors = write_table(join(root, "errors"), "errors-0.parquet", of.errors_table([]), options)
    rows = sum(f["rows"] for f in data_files)
    if manifest:
        document = {
            "format": of.FORMAT_NAME, "format_version": of.FORMAT_VERSION, "complete": True,
            "data_files": data_files,
            "errors_file": {"path": "errors/errors-0.parquet", "rows": 0, "bytes": errors["bytes"]},
            "rows": rows, "errors": 0, "images": rows, "errors_by_reason": {}, "vocabulary": VOCABULARY,
            "settings_id": "sha256:c", "run_id": "r1", "written": "2025-01-01T00:00:00Z", "metrics": None,
        }  # fmt: skip
        write_bytes(join(root, "_manifest.json"), json.dumps(document).encode(), options)
    return root


@pytest.fixture
def labels(tmp_path) -> str:
    return write_output(str(tmp_path / "labels"), str(tmp_path / "images"))


def _files_under(folder) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------------------
# readers


def test_targets_have_the_boxes_labels_and_masks_of_the_kept_instances(labels):
    """LabelDataset addresses rows across files and gives the image as written plus Mask R-CNN
    targets whose boxes (x1 y1 x2 y2, pixel edges), labels and masks are the hand-made ones;
    an image without instances gives empty tensors of the right shapes."""
    dataset = LabelDataset(labels, task="instance")
    assert len(dataset) == 3 and dataset.num_classes == 2
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert torch.equal(image, torch.from_numpy(_image("a")).permute(2, 0, 1))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[10, 8, 30, 24], [35, 30, 60, 50]]
    assert target["labels"].tolist() == [1, 2]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, SIZE, SIZE)
    for mask, (_, _, region) in zip(target["masks"], INSTANCES["a"]):
        expected = np.zeros((SIZE, SIZE), np.uint8)
        expected[region] = 1
        assert np.array_equal(mask.numpy(), expected)
    _, target = dataset[1]  # cls/b, the second row of the first file
    assert target["boxes"].tolist() == [[5, 5, 41, 41]] and target["labels"].tolist() == [2]
    image, target = dataset[2]  # c, the second file
    assert torch.equal(image, torch.from_numpy(_image("c")).permute(2, 0, 1))
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, SIZE, SIZE)
    assert [row["image_id"] for row in open_labels(labels).images()] == ["a", "cls/b", "c"]


def test_score_threshold_and_min_area_drop_the_fragments(labels):
    """By default the score-0 fragment (4 px) and the 10 px piece are dropped; with the
    threshold at 0 and min_area 0 both come back, and each filter alone drops only its own."""
    run = open_labels(labels)
    rows = list(run.iter_rows())
    assert [len(instance_targets(row, run)["labels"]) for row in rows] == [2, 1, 0]
    everything = [len(instance_targets(row, run, score_threshold=0, min_area=0)["labels"]) for row in rows]
    assert everything == [3, 2, 0]
    assert [len(instance_targets(row, run, min_area=0)["labels"]) for row in rows] == [2, 2, 0]  # the 0.5 piece
    assert [len(instance_targets(row, run, score_threshold=0)["labels"]) for row in rows] == [2, 1, 0]  # 4 px < 16
    assert instance_targets(rows[0], run, score_threshold=0.75)["labels"].tolist() == [1]


def test_semantic_target_is_the_class_map_and_ignores_low_scoring_instances(labels):
    """task="semantic" gives the labeled class map as (H, W) int64; ignore_below turns the
    pixels of instances scoring below it into 255 and leaves every other pixel alone."""
    dataset = LabelDataset(labels, task="semantic")
    _, target = dataset[0]
    assert target.dtype == torch.int64 and target.shape == (SIZE, SIZE)
    assert np.array_equal(target.numpy(), _semantic("a"))
    run = open_labels(labels)
    row = next(run.iter_rows())
    ignored = semantic_target(row, run, ignore_below=0.05).numpy()
    expected = _semantic("a").astype(np.int64)
    expected[60:62, 0:2] = 255
    assert np.array_equal(ignored, expected)


def test_unfinished_empty_and_foreign_runs_are_refused(tmp_path, capsys):
    """No _manifest.json: an unfinished run, the error says to rerun the label command; a run
    with 0 labeled images is refused as empty; neither the readers nor the export write anything."""
    unfinished = write_output(str(tmp_path / "unfinished"), str(tmp_path / "images"), manifest=False)
    with pytest.raises(LabelRunError, match="did not finish.*rerun the same `irnet-ray label`"):
        LabelDataset(unfinished)
    with pytest.raises(LabelRunError, match="no labeling output"):
        open_labels(str(tmp_path / "nothing"))
    dest = tmp_path / "coco.json"
    assert main(["export", "coco", "--labels", unfinished, "--output", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("irnet-ray export coco: the labeling run") and len(err.strip().splitlines()) == 1
    assert not dest.exists()
    empty = write_output(str(tmp_path / "empty"), str(tmp_path / "images"), files=[[]])
    with pytest.raises(LabelRunError, match="labeled 0 images"):
        open_labels(empty)
    assert main(["export", "voc", "--labels", empty, "--output", str(tmp_path / "voc")]) == 2
    assert "labeled 0 images" in capsys.readouterr().err and not (tmp_path / "voc").exists()


def test_a_class_id_outside_the_vocabulary_is_refused(tmp_path):
    """An instance of class 3 in a run whose vocabulary has 2 classes: the dataset item and both
    exports fail naming the image, and the COCO export writes nothing."""
    def rows_of(image_id, uri):
        if image_id != "cls/b":
            return _row(image_id, uri)
        return _row(image_id, uri, class_names=VOCABULARY + ["bird"], instances=[(3, 0.9, (slice(0, 9), slice(0, 9)))])

    labels = write_output(str(tmp_path / "labels"), str(tmp_path / "images"), rows_of=rows_of)
    with pytest.raises(LabelRunError, match="'cls/b'.*class id 3 is outside"):
        LabelDataset(labels)[1]
    with pytest.raises(LabelRunError, match="'cls/b'.*class id 3 is outside"):
        LabelDataset(labels, task="semantic")[1]
    dest = tmp_path / "coco.json"
    with pytest.raises(LabelRunError, match="class id 3"):
        export_coco(labels, str(dest))
    assert not dest.exists()
    with pytest.raises(LabelRunError, match="class id 3"):
        export_voc(labels, str(tmp_path / "voc"))
    assert not (tmp_path / "voc" / "ImageSets").exists()


# --------------------------------------------------------------------------------------
# exports


def test_coco_export_loads_in_pycocotools_and_scores_ap_1_against_itself(labels, tmp_path):
    """The COCO JSON has the images (file_name = URI), the kept instances as RLE annotations
    (counts a str, ids from 1) and the vocabulary as categories; pycocotools loads it and
    COCOeval of the export against itself gives AP 1.0 (segm and bbox)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dest = tmp_path / "coco.json"
    summary = export_coco(labels, str(dest))
    assert summary["annotations"] == 3 and summary["dropped"] == 2 and summary["images"] == 3
    document = json.loads(dest.read_text())
    assert [(c["id"], c["name"]) for c in document["categories"]] == [(1, "cat"), (2, "dog")]
    image_files = [str(tmp_path / "images" / f"{n}.png") for n in ("a", "cls_b", "c")]
    assert [i["file_name"] for i in document["images"]] == image_files
    first = document["annotations"][0]
    assert isinstance(first["segmentation"]["counts"], str) and first["iscrowd"] == 0
    assert first["bbox"] == [10, 8, 20, 16] and first["area"] == 320 and first["category_id"] == 1
    assert [a["score"] for a in document["annotations"]] == pytest.approx([0.9, 0.7, 0.8])
    ground_truth = COCO(str(dest))
    assert len(ground_truth.getAnnIds()) == 3 and ground_truth.annToMask(ground_truth.anns[1]).sum() == 320
    detections = ground_truth.loadRes([dict(a) for a in document["annotations"]])
    for kind in ("segm", "bbox"):
        evaluation = COCOeval(ground_truth, detections, kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0), kind


def test_an_existing_destination_is_refused_and_nothing_is_written(labels, tmp_path, capsys):
    """COCO: an existing JSON is kept (clear one-line error, status 2) unless --overwrite. VOC:
    a non-empty folder without the export marker, or holding an export of another run, is
    refused and left as it was."""
    dest = tmp_path / "coco.json"
    dest.write_text("mine")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export_coco(labels, str(dest))
    assert main(["export", "coco", "--labels", labels, "--output", str(dest)]) == 2
    assert "--overwrite" in capsys.readouterr().err and dest.read_text() == "mine"
    assert main(["export", "coco", "--labels", labels, "--output", str(dest), "--overwrite"]) == 0
    assert "3 annotation(s)" in capsys.readouterr().out and json.loads(dest.read_text())["annotations"]

    foreign = tmp_path / "VOC2012"
    (foreign / "SegmentationClass").mkdir(parents=True)
    (foreign / "SegmentationClass" / "a.png").write_bytes(b"ground truth")
    before = _files_under(foreign)
    with pytest.raises(ExportError, match=f"holds no {EXPORT_MARKER}"):
        export_voc(labels, str(foreign))
    assert _files_under(foreign) == before and (foreign / "SegmentationClass" / "a.png").read_bytes() == b"ground truth"
    other = tmp_path / "voc"
    export_voc(labels, str(other), min_area=0)
    before = _files_under(other)
    with pytest.raises(ExportError, match="min_area differ"):
        export_voc(labels, str(other))
    assert _files_under(other) == before


def test_voc_export_writes_palette_pngs_and_resumes(labels, tmp_path, capsys, monkeypatch):
    """SegmentationClass / SegmentationObject are mode-P PNGs with VOC's palette whose indices
    are the class ids and the instance numbers (dropped fragments 255); "cls/b" becomes a
    sub-folder; the list names every id; a rerun skips finished images and redoes a missing PNG;
    past MAX_VOC_INSTANCES the lowest-scoring instances become 255."""
    dest = tmp_path / "voc"
    assert main(["export", "voc", "--labels", labels, "--output", str(dest)]) == 0
    assert "3 image(s): 3 written, 0 already there" in capsys.readouterr().out
    assert (dest / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == ["a", "cls/b", "c"]
    uris = (dest / "ImageSets" / "Segmentation" / "train_uris.txt").read_text().splitlines()
    assert uris[1] == f"cls/b\t{tmp_path / 'images' / 'cls_b.png'}"
    palette = of.voc_palette().reshape(-1).tolist()
    for image_id in ("a", "cls/b", "c"):
        for kind in ("SegmentationClass", "SegmentationObject"):
            with Image.open(dest / kind / f"{image_id}.png") as png:
                assert png.mode == "P" and png.getpalette()[: len(palette)] == palette
        with Image.open(dest / "SegmentationClass" / f"{image_id}.png") as png:
            assert np.array_equal(np.asarray(png), _semantic(image_id))
    with Image.open(dest / "SegmentationObject" / "a.png") as png:
        objects = np.asarray(png)
    expected = np.zeros((SIZE, SIZE), np.uint8)
    expected[8:24, 10:30], expected[30:50, 35:60], expected[60:62, 0:2] = 1, 2, 255
    assert np.array_equal(objects, expected)
    with Image.open(dest / "SegmentationObject" / "cls" / "b.png") as png:
        assert sorted(np.unique(np.asarray(png)).tolist()) == [0, 1, 255]

    assert export_voc(labels, str(dest))["skipped"] == 3
    (dest / "SegmentationObject" / "cls" / "b.png").unlink()
    again = export_voc(labels, str(dest))
    assert again["written"] == 1 and again["skipped"] == 2
    assert (dest / "SegmentationObject" / "cls" / "b.png").exists()

    monkeypatch.setattr(export_module, "MAX_VOC_INSTANCES", 1)  # past the cap: the lower-scoring one is 255
    assert export_voc(labels, str(tmp_path / "capped"))["unsure_instances"] == 3  # a: fragment + dog, cls/b: 10 px
    with Image.open(tmp_path / "capped" / "SegmentationObject" / "a.png") as png:
        expected[30:50, 35:60] = 255
        assert np.array_equal(np.asarray(png), expected)


def test_voc_names_are_reversible_and_stay_inside_the_folder():
    """Ordinary ids keep their name ("cls/name" a sub-folder); odd characters, "." and ".."
    parts are percent-encoded so no name leaves the folder and unquote gives the id back."""
    assert voc_name("2007_000032") == "2007_000032"
    assert voc_name("n01440764/n01440764_10026") == "n01440764/n01440764_10026"
    for image_id in ("a b%c", "../etc/passwd", "x/./y", "ü:*?\\", "100%"):
        name = voc_name(image_id)
        assert image_id_from_voc_name(name) == image_id
        assert not {".", ".."} & set(name.split("/")) and "\\" not in name and " " not in name
    with pytest.raises(ValueError, match="empty path part"):
        voc_name("/abs/x")


# --------------------------------------------------------------------------------------
# S3, Ray, training


def test_label_dataset_reads_an_output_on_s3(s3_server, s3_bucket, tmp_path):
    """The whole output and its images on the moto S3 server over HTTP: LabelDataset gives the
    same images and targets as from a local folder, and the COCO export reads it too."""
    options = StorageOptions(endpoint_url=s3_server)
    root = write_output(f"s3://{s3_bucket}/labels", f"s3://{s3_bucket}/images", options)
    dataset = LabelDataset(root, options=options)
    image, target = dataset[0]
    assert torch.equal(image, torch.from_numpy(_image("a")).permute(2, 0, 1))
    assert target["boxes"].tolist() == [[10, 8, 30, 24], [35, 30, 60, 50]]
    assert dataset[2][1]["labels"].shape == (0,)
    summary = export_coco(root, str(tmp_path / "coco.json"), options=options)
    assert summary["annotations"] == 3
    first_image = json.loads((tmp_path / "coco.json").read_text())["images"][0]
    assert first_image["file_name"] == f"s3://{s3_bucket}/images/a.png"


def test_label_dataset_ray_reads_exactly_the_manifest_files(labels, monkeypatch):
    """label_dataset_ray hands ray.data.read_parquet the manifest's data files, and only them
    (an uncommitted file in data/ is not read), with the storage's pyarrow filesystem."""
    import pyarrow.fs as pafs
    import ray.data

    write_bytes(join(labels, "data", "part-uncommitted.parquet"), b"not committed")
    calls = []
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kwargs: calls.append((paths, kwargs)) or "dataset")
    assert label_dataset_ray(labels, columns=["image_id"]) == "dataset"
    (paths, kwargs), = calls
    assert paths == [join(labels, "data", "part-0.parquet"), join(labels, "data", "part-1.parquet")]
    assert isinstance(kwargs["filesystem"], pafs.LocalFileSystem) and kwargs["columns"] == ["image_id"]


def test_one_training_step_of_mask_rcnn_and_deeplab(labels):
    """A batch from LabelDataset trains torchvision's maskrcnn_resnet50_fpn (instance task) and
    deeplabv3_resnet50 (semantic task, 255 ignored) for one step with finite losses (small
    images and proposal counts keep it to seconds on a CPU)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.segmentation import deeplabv3_resnet50

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only add contention
    try:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(LabelDataset(labels), batch_size=3, collate_fn=detection_collate)
        images, targets = next(iter(loader))
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=SIZE, max_size=SIZE,
                                      rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                                      rpn_batch_size_per_image=64, box_batch_size_per_image=32)  # fmt: skip
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
        losses = model([image.float() / 255 for image in images], targets)
        assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
        total = sum(losses.values())
        assert all(math.isfinite(float(v)) for v in losses.values()) and float(losses["loss_mask"]) > 0
        total.backward()
        optimizer.step()

        semantic = LabelDataset(labels, task="semantic", ignore_below=0.05)
        images, masks = next(iter(torch.utils.data.DataLoader(semantic, batch_size=3)))
        assert masks.shape == (3, SIZE, SIZE) and int(masks.max()) == 255
        segmenter = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
        segmenter.train()
        logits = segmenter(images.float() / 255)["out"]
        loss = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
        assert math.isfinite(float(loss))
        loss.backward()
    finally:
        torch.set_num_threads(threads)


def test_export_help_imports_neither_torch_nor_ray():
    """``irnet-ray export coco|voc --help`` answers from the configs alone (no torch, no Ray)."""
    script = ("import sys, contextlib, io\nfrom irnet_ray.cli import build_parser\n"
              "for command in (['export', '--help'], ['export', 'coco', '--help'], ['export', 'voc', '--help']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
              "        build_parser().parse_args(command)\n"
              "    assert '--' in out.getvalue() or 'coco' in out.getvalue(), command\n"
              "import irnet_ray.downstream.export\n"
              "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
