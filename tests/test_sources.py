import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from irnet_ray.data.decode import decode_image
from irnet_ray.data.sources import (
    VOC_CLASSES,
    ClassVocabulary,
    EmptyImageSetError,
    ImageRecord,
    ManifestError,
    MissingImageError,
    UnknownClassError,
    load_records,
    load_synthetic,
    parse_builtin_spec,
    read_image_folder,
    read_manifest,
    read_voc,
    read_voc_masks,
    records_table,
    synthetic_records,
    synthetic_uri,
)
from irnet_ray.data.storage import StorageNotFound, StorageOptions, read_bytes, write_bytes
from irnet_ray.data.synthetic import SyntheticConfig, generate_sample


def _png(color=(10, 20, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _palette_png(indices: np.ndarray) -> bytes:
    image = Image.fromarray(indices.astype(np.uint8), mode="L").copy()
    palette = np.zeros((256, 3), np.uint8)
    palette[1:21] = np.random.default_rng(0).integers(0, 256, (20, 3))
    palette[255] = (224, 224, 192)  # VOC boundary colour
    image.putpalette(palette.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# vocabulary and records


def test_vocabulary_ids_json_and_validation():
    vocab = ClassVocabulary(("cat", "dog", "horse"))
    assert vocab.id_of("cat") == 1 and vocab.id_of("horse") == 3 and vocab.name_of(2) == "dog"
    assert vocab.ids_of(["horse", "cat", "horse"]) == (1, 3)
    assert ClassVocabulary.from_json(vocab.to_json()) == vocab
    assert ClassVocabulary.from_json('["a", "b"]').names == ("a", "b")
    assert pickle.loads(pickle.dumps(vocab)) == vocab
    with pytest.raises(UnknownClassError, match=r"unknown class 'dgo'; did you mean 'dog'\?") as info:
        vocab.id_of("dgo")
    assert "known classes: cat, dog, horse" in str(info.value) and info.value.suggestions == ("dog",)
    assert isinstance(info.value, ValueError)
    assert vocab.suggestions("Dog")[0] == "dog"
    err = pickle.loads(pickle.dumps(info.value))
    assert str(err) == str(info.value) and err.name == "dgo"
    for bad in ((), ("a", "a"), ("a", ""), ("a", " b"), "abc", (1, 2)):
        with pytest.raises(ValueError):
            ClassVocabulary(bad)


def test_image_record_normalizes_classes_and_round_trips():
    record = ImageRecord("x", "/data/x.jpg", (3, 1, 3))
    assert record.classes == (1, 3)
    assert ImageRecord.from_row(record.to_row()) == record
    table = records_table([record, ImageRecord("y", "s3://b/y.jpg", (), source_row=2)])
    assert table.num_rows == 2 and table.column("classes").to_pylist() == [[1, 3], []]
    with pytest.raises(ValueError):
        ImageRecord("z", "/z.jpg", (0,))


# --------------------------------------------------------------------------------------
# manifests

ROWS = [
    {"image": "images/cat_001.png", "classes": ["cat"]},
    {"image": "images/dog_001.png", "classes": ["dog", "cat"]},
    {"image": "images/empty.png", "classes": []},
]


def _write_manifest(path, fmt, rows=ROWS):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        lines = ["image,classes"] + [f"{r['image']},{'|'.join(r['classes'])}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_and_relative_paths(tmp_path, fmt):
    manifest = _write_manifest(tmp_path / "sets" / f"train.{fmt}", fmt)
    records, vocab = read_manifest(str(manifest))
    assert vocab.names == ("cat", "dog")
    assert [r.image_id for r in records] == ["cat_001", "dog_001", "empty"]
    assert records[0].uri == str(tmp_path / "sets" / "images" / "cat_001.png")
    assert records[1].classes == (1, 2)
    assert records[2].classes == ()  # kept: the labeling job records "no classes"
    assert [r.source_row for r in records] == [1, 2, 3]


def test_manifest_columns_ids_ground_truth_and_separators(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,path,labels,semantic\n"
        "0001,a.jpg,cat; dog,gt/0001.png\n"
        "0002,/abs/b.jpg,dog|cat,\n"
        "0003,s3://bkt/c.jpg,cat,\n"
    )
    vocab = ClassVocabulary(("cat", "dog", "bird"))
    records, out_vocab = read_manifest(
        str(tmp_path / "m.csv"), vocabulary=vocab, image_column="path", classes_column="labels", id_column="id"
    )
    assert out_vocab is vocab
    assert [r.image_id for r in records] == ["0001", "0002", "0003"]  # strings stay strings
    assert [r.uri for r in records] == [str(tmp_path / "a.jpg"), "/abs/b.jpg", "s3://bkt/c.jpg"]
    assert records[0].classes == (1, 2) and records[1].classes == (1, 2)
    assert records[0].semantic_uri == str(tmp_path / "gt" / "0001.png") and records[1].semantic_uri is None


def test_manifest_class_ids_with_vocabulary(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "classes": [2, 1]}\n')
    records, _ = read_manifest(str(tmp_path / "m.jsonl"), vocabulary=ClassVocabulary(("a", "b")))
    assert records[0].classes == (1, 2)
    with pytest.raises(ManifestError, match="need a vocabulary"):
        read_manifest(str(tmp_path / "m.jsonl"))


def test_manifest_unknown_class_names_row_image_and_suggestion(tmp_path):
    rows = ROWS[:2] + [{"image": "images/dog_002.jpg", "classes": ["dgo"]}]
    manifest = _write_manifest(tmp_path / "m.csv", "csv", rows)
    with pytest.raises(UnknownClassError) as info:
        read_manifest(str(manifest), vocabulary=ClassVocabulary(("cat", "dog", "horse")))
    message = str(info.value)
    assert message.startswith(f"manifest {manifest}: row 3 (image images/dog_002.jpg): unknown class 'dgo'; did you "
                              "mean 'dog'?")  # fmt: skip
    assert "known classes: cat, dog, horse" in message


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,labels\na.jpg,cat\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.csv"))
    message = str(info.value)
    assert "missing required column(s) 'image', 'classes'" in message
    assert "found columns: 'path', 'labels'" in message and "image_column=" in message


def test_manifest_duplicate_ids_name_both_rows(tmp_path):
    rows = [{"image": "a/x.jpg", "classes": ["cat"]}, {"image": "b.jpg", "classes": ["cat"]},
            {"image": "b/x.png", "classes": ["cat"]}]  # fmt: skip
    manifest = _write_manifest(tmp_path / "m.jsonl", "jsonl", rows)
    with pytest.raises(ManifestError, match=r"duplicate image id 'x' in row 1 \(image .*a/x.jpg\) and row 3") as info:
        read_manifest(str(manifest))
    assert "'image_id' column" in str(info.value)


def test_manifest_empty_and_malformed(tmp_path):
    (tmp_path / "header_only.csv").write_text("image,classes\n")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"image": pa.array([], pa.string()), "classes": pa.array([], pa.list_(pa.string()))}),
                   tmp_path / "none.parquet")  # fmt: skip
    for name in ("header_only.csv", "zero.jsonl", "none.parquet"):
        with pytest.raises(EmptyImageSetError):
            read_manifest(str(tmp_path / name))
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "classes": ["x"]}\n{oops\n')
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"\.parquet, \.csv, \.jsonl"):
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(StorageNotFound):
        read_manifest(str(tmp_path / "missing.csv"))


def test_manifest_check_exists(tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", "csv")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat_001.png").write_bytes(_png())
    assert len(read_manifest(str(manifest))[0]) == 3
    with pytest.raises(MissingImageError, match="2 of 3 listed images do not exist: dog_001, empty") as info:
        read_manifest(str(manifest), check_exists=True)
    assert info.value.missing == ("dog_001", "empty")


@pytest.mark.timeout(60)
def test_manifest_over_s3_resolves_relative_paths(s3_server, s3_bucket, tmp_path):
    options = StorageOptions(endpoint_url=s3_server)
    local = _write_manifest(tmp_path / "m.parquet", "parquet")
    write_bytes(f"s3://{s3_bucket}/sets/train.parquet", local.read_bytes(), options)
    for row in ROWS:
        write_bytes(f"s3://{s3_bucket}/sets/{row['image']}", _png(), options)
    records, vocab = read_manifest(f"s3://{s3_bucket}/sets/train.parquet", options, check_exists=True)
    assert vocab.names == ("cat", "dog")
    assert records[1].uri == f"s3://{s3_bucket}/sets/images/dog_001.png"
    assert decode_image(read_bytes(records[1].uri, options)).shape == (4, 6, 3)
    records2, _ = load_records(f"s3://{s3_bucket}/sets/train.parquet", options)
    assert records2 == records


# --------------------------------------------------------------------------------------
# image folder trees


def _tree(root):
    for rel in ("cat/a.jpg", "dog/b.PNG", "dog/sub/c.jpeg", "dog/notes.txt", "dog/.hidden.jpg", ".cache/z.jpg"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png())
    return root


def test_image_folder_tree(tmp_path):
    root = _tree(tmp_path / "tree")
    records, vocab = read_image_folder(str(root))
    assert vocab.names == ("cat", "dog")
    assert [(r.image_id, r.classes) for r in records] == [("cat/a", (1,)), ("dog/b", (2,)), ("dog/sub/c", (2,))]
    assert records[1].uri == str(root / "dog" / "b.PNG")
    records, vocab = read_image_folder(str(root), vocabulary=ClassVocabulary(("bird", "cat", "dog")))
    assert [r.classes for r in records] == [(2,), (3,), (3,)]
    with pytest.raises(UnknownClassError, match=r"class folder 'dog'.*unknown class 'dog'; did you mean 'dogs'"):
        read_image_folder(str(root), vocabulary=ClassVocabulary(("cat", "dogs")))


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "readme.md").write_text("x")
    with pytest.raises(EmptyImageSetError, match=str(tmp_path / "empty")):
        read_image_folder(str(tmp_path / "empty"))
    with pytest.raises(StorageNotFound):
        read_image_folder(str(tmp_path / "nowhere"))
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "x.jpg").write_bytes(_png())
    with pytest.raises(ManifestError, match="no class folder: x.jpg"):
        read_image_folder(str(tmp_path / "loose"))


# --------------------------------------------------------------------------------------
# PASCAL VOC


def _annotation(names) -> str:
    objects = "".join(
        f"<object><name>{n}</name><difficult>{i % 2}</difficult><bndbox><xmin>1</xmin></bndbox></object>"
        for i, n in enumerate(names)
    )
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


VOC_IMAGES = {
    "2007_000032": ["aeroplane", "aeroplane", "person"],
    "2007_000039": ["tvmonitor"],
    "2007_000063": ["dog", "chair"],
}


def _write_voc(write, with_masks=("2007_000032", "2007_000039")):
    write("ImageSets/Segmentation/train.txt", ("\n".join(VOC_IMAGES) + "\n").encode())
    write("ImageSets/Segmentation/val.txt", b"2007_000032\n")
    for image_id, names in VOC_IMAGES.items():
        write(f"JPEGImages/{image_id}.jpg", _png())
        write(f"Annotations/{image_id}.xml", _annotation(names).encode())
    semantic = np.zeros((4, 6), np.uint8)
    semantic[1:3, 1:3] = 1
    semantic[0, :] = 255
    instance = np.zeros((4, 6), np.uint8)
    instance[1:3, 1:2] = 1
    instance[1:3, 2:3] = 2
    instance[0, :] = 255
    for image_id in with_masks:
        write(f"SegmentationClass/{image_id}.png", _palette_png(semantic))
        write(f"SegmentationObject/{image_id}.png", _palette_png(instance))
    return semantic, instance


def _local_writer(root):
    def write(rel, data):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write


def test_voc_layout(tmp_path):
    root = tmp_path / "VOC2012"
    _write_voc(_local_writer(root))
    records, vocab = read_voc(str(root))
    assert vocab.names == VOC_CLASSES
    assert [r.image_id for r in records] == list(VOC_IMAGES)
    by_id = {r.image_id: r for r in records}
    assert by_id["2007_000032"].classes == (VOC_CLASSES.index("aeroplane") + 1, VOC_CLASSES.index("person") + 1)
    assert by_id["2007_000063"].classes == (9, 12)  # chair, dog
    assert by_id["2007_000032"].uri == str(root / "JPEGImages" / "2007_000032.jpg")
    assert by_id["2007_000032"].semantic_uri == str(root / "SegmentationClass" / "2007_000032.png")
    assert by_id["2007_000032"].instance_uri == str(root / "SegmentationObject" / "2007_000032.png")
    assert by_id["2007_000063"].semantic_uri is None and by_id["2007_000063"].instance_uri is None
    assert [r.source_row for r in records] == [1, 2, 3]
    assert [r.image_id for r in read_voc(str(root), split="val")[0]] == ["2007_000032"]


def test_voc_masks_use_palette_indices(tmp_path):
    semantic, instance = _write_voc(_local_writer(tmp_path))
    sem, inst = read_voc_masks(
        (tmp_path / "SegmentationClass" / "2007_000032.png").read_bytes(),
        (tmp_path / "SegmentationObject" / "2007_000032.png").read_bytes(),
    )
    assert sem.dtype == np.uint8 and inst.dtype == np.int32
    np.testing.assert_array_equal(sem, semantic)  # 255 boundary kept as ignore
    assert inst[0].max() == 0 and inst[1, 1] == 1 and inst[1, 2] == 2  # 255 -> 0
    assert read_voc_masks(None, None) == (None, None)
    rgb = io.BytesIO()
    Image.new("RGB", (6, 4)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="palette"):
        read_voc_masks(rgb.getvalue(), None)


def test_voc_errors(tmp_path):
    root = tmp_path / "VOC2012"
    _write_voc(_local_writer(root))
    with pytest.raises(ManifestError) as info:
        read_voc(str(root), split="trainval")
    message = str(info.value)
    assert str(root / "ImageSets" / "Segmentation" / "trainval.txt") in message
    assert "available splits: train, val" in message
    (root / "JPEGImages" / "2007_000039.jpg").unlink()
    assert len(read_voc(str(root))[0]) == 3  # reading is lazy: the decode stage records it
    with pytest.raises(MissingImageError, match="2007_000039") as err:
        read_voc(str(root), check_exists=True)
    assert err.value.missing == ("2007_000039",)
    (root / "Annotations" / "2007_000063.xml").write_text(_annotation(["dgo"]))
    with pytest.raises(UnknownClassError, match=r"line 3.*2007_000063.*'dgo'; did you mean 'dog'"):
        read_voc(str(root))
    (root / "Annotations" / "2007_000063.xml").unlink()
    with pytest.raises(ManifestError, match="no annotation.*2007_000063"):
        read_voc(str(root))


@pytest.mark.timeout(60)
def test_voc_over_s3(s3_server, s3_bucket):
    options = StorageOptions(endpoint_url=s3_server)
    root = f"s3://{s3_bucket}/VOCdevkit/VOC2012"
    _write_voc(lambda rel, data: write_bytes(f"{root}/{rel}", data, options))
    records, _ = load_records(root, options, check_exists=True)  # detected as VOC
    assert [r.image_id for r in records] == list(VOC_IMAGES)
    assert records[0].semantic_uri == f"{root}/SegmentationClass/2007_000032.png"
    assert records[2].classes == (9, 12)


# --------------------------------------------------------------------------------------
# built-in synthetic set and the dispatcher


def test_synthetic_records_and_load():
    config = SyntheticConfig(num_images=4, image_size=(48, 48), num_classes=3, seed=7)
    records, vocab = synthetic_records(config)
    assert vocab.names == config.class_names and len(records) == 4
    assert records[2].uri.startswith("synthetic://7/2?")
    sample = load_synthetic(records[2].uri)
    expected = generate_sample(config, 2)
    np.testing.assert_array_equal(sample.image, expected.image)
    assert records[2].classes == tuple(expected.classes.tolist()) and records[2].image_id == expected.image_id
    assert synthetic_uri(SyntheticConfig(), 5) == "synthetic://0/5"
    with pytest.raises(ValueError, match="out of range"):
        load_synthetic("synthetic://7/9?num_images=4")


def test_builtin_spec():
    config = parse_builtin_spec("builtin:num_images=3,seed=2,image_size=40,object_size=10x20,noise_std=1.5")
    assert (config.num_images, config.seed, config.image_size, config.object_size, config.noise_std) == (
        3, 2, (40, 40), (10.0, 20.0), 1.5,
    )  # fmt: skip
    assert parse_builtin_spec("builtin") == SyntheticConfig()
    with pytest.raises(ValueError, match="unknown setting 'num_image'"):
        parse_builtin_spec("builtin:num_image=3")
    with pytest.raises(ValueError, match="num_classes"):
        parse_builtin_spec("builtin:num_classes=99")


def test_load_records_dispatch(tmp_path):
    records, vocab = load_records("builtin:num_images=2,image_size=32")
    assert len(records) == 2 and records[0].uri.startswith("synthetic://0/0")
    voc = tmp_path / "VOC2012"
    _write_voc(_local_writer(voc))
    assert len(load_records(str(voc))[0]) == 3
    assert len(load_records(f"voc:{voc}", split="val")[0]) == 1
    manifest = _write_manifest(tmp_path / "m.jsonl", "jsonl")
    assert [r.image_id for r in load_records(str(manifest))[0]] == ["cat_001", "dog_001", "empty"]
    assert len(load_records(f"manifest:{manifest}")[0]) == 3
    tree = _tree(tmp_path / "tree")
    assert len(load_records(str(tree))[0]) == 3
    assert len(load_records(f"folder:file://{tree}")[0]) == 3
    with pytest.raises(StorageNotFound, match="image set not found"):
        load_records(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        load_records("gs://bucket/set")
    with pytest.raises(ValueError, match="does not match"):
        load_records("builtin:num_images=1", vocabulary=ClassVocabulary(("a",)))


def test_sources_do_not_import_ray_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, irnet_ray.data.sources, irnet_ray.data.storage, irnet_ray.data.decode; "
        "bad = [m for m in ('ray', 'torch', 'boto3') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_voc_train_aug(tmp_path):
    """``voc:ROOT?split=train_aug`` reads DeepLab's layout of the augmented set (what the paper
    trains on): ids from ``ImageSets/SegmentationAug/train_aug.txt`` lines of paths, classes
    from the XML annotations, ground truth from ``SegmentationClass`` where VOC has it, else
    ``SegmentationClassAug`` (grey-level class indices)."""
    root = tmp_path / "VOC2012"
    write = _local_writer(root)
    _write_voc(write, with_masks=("2007_000032",))
    write("ImageSets/SegmentationAug/train_aug.txt",
          "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in VOC_IMAGES).encode())  # fmt: skip
    grey = Image.fromarray(np.array([[0, 12], [255, 9]], np.uint8), mode="L")
    for image_id in VOC_IMAGES:
        buffer = io.BytesIO()
        grey.save(buffer, format="PNG")
        write(f"SegmentationClassAug/{image_id}.png", buffer.getvalue())
    records, _ = load_records(f"voc:{root}?split=train_aug")
    assert [r.image_id for r in records] == list(VOC_IMAGES)
    assert records[2].classes == (9, 12)
    assert records[0].semantic_uri == str(root / "SegmentationClass" / "2007_000032.png")
    assert records[1].semantic_uri == str(root / "SegmentationClassAug" / "2007_000039.png")
    semantic, _ = read_voc_masks((root / "SegmentationClassAug" / "2007_000039.png").read_bytes(), None)
    assert semantic.tolist() == [[0, 12], [255, 9]]
    assert len(load_records(f"voc:{root}?split=val")[0]) == 1
    with pytest.raises(ManifestError, match="available splits: train, train_aug, val"):
        load_records(f"voc:{root}?split=trainval")
    with pytest.raises(ValueError, match="unknown setting"):
        load_records(f"voc:{root}?splt=train_aug")
