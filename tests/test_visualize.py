"""Fig. 6 panels: the rendering functions on hand-made inputs, and `irnet-ray visualize` end to end
with random-init ResNet-18 models saved as model folders (local and S3 output)."""

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from irnet_ray.cli import main
from irnet_ray.config import BackboneConfig, CamInferenceConfig, SynthesisConfig, config_to_dict
from irnet_ray.data.sources import ClassVocabulary, load_records, load_synthetic
from irnet_ray.data.synthetic import SyntheticConfig, class_names, colorize_labels
from irnet_ray.inference import ImageInference, label_image
from irnet_ray.model_files import load_irn_model, save_model
from irnet_ray.models.cam import CamNet, CamOutput
from irnet_ray.models.irnet import IRNet
from irnet_ray.synthesis import InstanceLabels, SynthesizedLabels
from irnet_ray.visualize import (
    FIGURE_NAME,
    PANEL_GAP,
    PANEL_TITLES,
    TITLE_HEIGHT,
    boundary_image,
    cam_heatmap,
    displacement_colour,
    figure6_row,
    instance_colour,
    jet,
    semantic_colour,
    to_image_size,
)


def _hue_saturation(rgb) -> tuple[float, float]:
    h, s, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
    return h, s


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


# --------------------------------------------------------------------------------------
# rendering functions


def test_jet_runs_blue_green_red():
    colours = jet(np.array([0.0, 0.5, 1.0, -3.0, 7.0])).astype(int)
    assert colours.shape == (5, 3) and jet(np.zeros(1)).dtype == np.uint8
    low, mid, high, below, above = colours
    assert low[2] > 100 and low[0] == 0 and low[1] == 0  # dark blue
    assert mid[1] == 255 and mid[0] < 200 and mid[2] < 200  # green
    assert high[0] > 100 and high[1] == 0 and high[2] == 0  # dark red
    assert (below == low).all() and (above == high).all()  # clipped to [0, 1]


def test_cam_heatmap_takes_the_max_over_classes_and_upsamples_stride4():
    image = np.full((16, 12, 3), 100, np.uint8)
    cams = np.zeros((2, 16, 12), np.float32)
    cams[0, 2, 3] = 1.0  # class 1 peaks at (2, 3), class 2 at (12, 9)
    cams[1, 12, 9] = 1.0
    out = cam_heatmap(image, cams, alpha=0.5)
    assert out.shape == (16, 12, 3) and out.dtype == np.uint8
    expected_hot = np.round(0.5 * 100 + 0.5 * jet(np.float32(1.0)).astype(float)).astype(np.uint8)
    expected_cold = np.round(0.5 * 100 + 0.5 * jet(np.float32(0.0)).astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out[2, 3], expected_hot)
    np.testing.assert_array_equal(out[12, 9], expected_hot)
    np.testing.assert_array_equal(out[8, 6], expected_cold)
    # stride-4 CAMs (ceil(16/4) x ceil(12/4)) come out at the image size, hot where the cell is
    strided = torch.zeros(1, 4, 3)
    strided[0, 3, 2] = 1.0
    up = cam_heatmap(image, strided)
    assert up.shape == (16, 12, 3)
    assert up[14, 9, 0] > up[2, 2, 0] and up[2, 2, 2] > up[14, 9, 2]  # red at the hot cell, blue far away
    # no classes: no heat anywhere
    assert (cam_heatmap(image, np.zeros((0, 16, 12))) == expected_cold).all()
    with pytest.raises(ValueError, match="stride-4"):
        cam_heatmap(image, np.zeros((1, 5, 5)))


def test_displacement_colour_is_a_colour_wheel_of_direction_and_magnitude():
    field = np.zeros((2, 3, 4), np.float32)  # (dy, dx)
    field[1, 0, 0], field[1, 0, 1] = 2.0, -2.0  # right, left
    field[0, 0, 2], field[0, 0, 3] = 2.0, -2.0  # down, up
    field[1, 1, 0] = 1.0  # right, half the magnitude
    rgb = displacement_colour(field, max_magnitude=2.0)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[2] == 255).all()  # zero displacement is white
    hues = [_hue_saturation(rgb[0, i])[0] for i in range(4)]
    saturations = [_hue_saturation(rgb[0, i])[1] for i in range(4)]
    assert min(saturations) > 0.95  # full magnitude: fully saturated
    assert _hue_distance(hues[0], hues[1]) > 0.48  # opposite directions: opposite hues
    assert _hue_distance(hues[2], hues[3]) > 0.48
    assert abs(_hue_distance(hues[0], hues[2]) - 0.25) < 0.02  # a quarter turn: a quarter of the wheel
    half_hue, half_saturation = _hue_saturation(rgb[1, 0])
    assert _hue_distance(half_hue, hues[0]) < 0.01 and 0.4 < half_saturation < 0.6
    # the field is rotated, not just painted: swapping dy and dx moves every hue
    assert not np.array_equal(displacement_colour(field[::-1].copy(), max_magnitude=2.0), rgb)


def test_displacement_colour_normalises_by_a_robust_max():
    field = np.zeros((2, 20, 20), np.float32)
    field[1] = 1.0  # everything points right with magnitude 1 ...
    field[:, 0, 0] = (0.0, 1000.0)  # ... except one wild vector (under 1% of the pixels)
    rgb = displacement_colour(field)
    assert _hue_saturation(rgb[5, 5])[1] > 0.95  # not washed out by the outlier
    assert (displacement_colour(np.zeros((2, 4, 4))) == 255).all()  # an all-zero field is white
    with pytest.raises(ValueError, match=r"\(2, h, w\)"):
        displacement_colour(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="finite"):
        displacement_colour(np.full((2, 2, 2), np.nan))


def test_boundary_instance_and_semantic_colours():
    gray = boundary_image(torch.tensor([[0.0, 1.0, 0.5]]))
    assert gray.shape == (1, 3, 3) and gray.dtype == np.uint8
    assert gray[0, 0].tolist() == [255] * 3 and gray[0, 1].tolist() == [0] * 3 and gray[0, 2].tolist() == [128] * 3
    masks = np.zeros((2, 4, 5), bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 3:] = True
    colours = instance_colour(masks)
    assert colours.shape == (4, 5, 3) and colours.dtype == np.uint8
    assert (colours[masks[0]] == colours[0, 0]).all() and (colours[masks[1]] == colours[3, 4]).all()
    assert colours[0, 0].tolist() != colours[3, 4].tolist() and colours[0, 0].any() and colours[3, 4].any()
    assert (colours[~masks.any(0)] == 0).all()  # background black
    assert (instance_colour(np.zeros((0, 4, 5), bool)) == 0).all()
    labels = np.array([[0, 1], [3, 3]], np.uint8)
    np.testing.assert_array_equal(semantic_colour(labels), colorize_labels(labels))
    assert semantic_colour(labels)[0, 0].tolist() == [0, 0, 0]


def test_to_image_size_repeats_stride4_cells_and_crops():
    cells = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(3, 2, 3)
    full = to_image_size(cells, (10, 7))  # ceil(10/4) = 3, ceil(7/4) = 2
    assert full.shape == (10, 7, 3)
    np.testing.assert_array_equal(full[9, 6], cells[2, 1])
    np.testing.assert_array_equal(full[4:8, 0:4], np.broadcast_to(cells[1, 0], (4, 4, 3)))
    assert to_image_size(full, (10, 7)) is full
    with pytest.raises(ValueError, match="stride-4"):
        to_image_size(cells, (20, 20))


def test_figure6_row_layout():
    height, width = 10, 13
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    strided = (3, 4)
    inference = ImageInference(
        cams=CamOutput(classes=torch.tensor([2]), strided=torch.rand(1, *strided), highres=torch.rand(1, height, width)),
        boundary=torch.rand(*strided),
        displacement=torch.randn(2, *strided),
    )
    semantic = np.zeros((height, width), np.uint8)
    semantic[2:6, 3:9] = 2
    labels = SynthesizedLabels(
        semantic=semantic,
        instances=InstanceLabels(masks=(semantic == 2)[None], classes=np.array([2]), scores=np.array([1.0], np.float32)),
        instance_map=np.zeros(strided, np.int32),
    )
    row = figure6_row(image, inference, labels)
    assert row.shape == (TITLE_HEIGHT + height, 6 * width + 5 * PANEL_GAP, 3) and row.dtype == np.uint8
    panels = [row[TITLE_HEIGHT:, n * (width + PANEL_GAP) : n * (width + PANEL_GAP) + width] for n in range(6)]
    np.testing.assert_array_equal(panels[0], image)
    np.testing.assert_array_equal(panels[1], cam_heatmap(image, inference.cams.highres))
    np.testing.assert_array_equal(panels[2], to_image_size(displacement_colour(inference.displacement), (height, width)))
    np.testing.assert_array_equal(panels[3], to_image_size(boundary_image(inference.boundary), (height, width)))
    np.testing.assert_array_equal(panels[4], instance_colour(labels.instances.masks))
    np.testing.assert_array_equal(panels[5], semantic_colour(semantic))
    assert (row[TITLE_HEIGHT:, width : width + PANEL_GAP] == 255).all()  # white gaps
    assert len(PANEL_TITLES) == 6 and (row[:TITLE_HEIGHT] < 128).any()  # titles drawn in the band


# --------------------------------------------------------------------------------------
# irnet-ray visualize end to end

SPEC = "builtin:num_images=4,image_size=64x64"
SIDE = 64
WALK = ["--walk-steps", "16", "--displacement-iterations", "10", "--device", "cpu"]
ROW_SIZE = (6 * SIDE + 5 * PANEL_GAP, TITLE_HEIGHT + SIDE)  # PIL (width, height)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """CAM and IRNet model folders with random-init ResNet-18 weights (nothing trained)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    backbone = BackboneConfig(arch="resnet18")
    vocabulary = ClassVocabulary(class_names(SyntheticConfig().num_classes))
    cam = CamNet(backbone, vocabulary.num_classes)
    irnet = IRNet(cam.backbone.channels)
    irnet.mean_displacement.copy_(torch.tensor([0.25, -0.5]))
    cam_uri = save_model(str(folder / "cam"), kind="cam", state_dict=cam.state_dict(),
                         config={"backbone": config_to_dict(backbone)}, vocabulary=vocabulary, metrics=[])
    irn_uri = save_model(str(folder / "irn"), kind="irn", state_dict=irnet.state_dict(),
                         config={"cam_model": cam_uri}, vocabulary=vocabulary, metrics=[])  # fmt: skip
    return cam_uri, irn_uri


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


@pytest.mark.timeout(300)
def test_visualize_command_writes_one_row_per_image_and_the_figure(models, tmp_path, capsys):
    cam_uri, irn_uri = models
    out = tmp_path / "panels"
    argv = ["visualize", "--images", SPEC, "--cam", cam_uri, "--irn", irn_uri, "--output", str(out), "--limit", "2"]
    assert main(argv + WALK) == 0
    assert "2 panel(s) written" in capsys.readouterr().out
    records = load_records(SPEC)[0][:2]  # the first --limit images of the set
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{n:03d}_{r.image_id}.png" for n, r in enumerate(records)] + [FIGURE_NAME])

    # Every row is exactly the rendering of label_image's outputs for that image.
    irnet, cam, _ = load_irn_model(irn_uri, cam_directory=cam_uri)
    synthesis = SynthesisConfig(steps=16, displacement_iterations=10)
    rows = []
    for n, record in enumerate(records):
        row = _png(out / f"{n:03d}_{record.image_id}.png")
        assert (row.shape[1], row.shape[0]) == ROW_SIZE
        image = load_synthetic(record.uri).image
        np.testing.assert_array_equal(row[TITLE_HEIGHT:, :SIDE], image)
        labels, inference = label_image(cam, irnet, image, record.classes, CamInferenceConfig(), synthesis)
        np.testing.assert_array_equal(row, figure6_row(image, inference, labels))
        rows.append(row)
    figure = _png(out / FIGURE_NAME)
    assert figure.shape == (2 * ROW_SIZE[1] + PANEL_GAP, ROW_SIZE[0], 3)
    np.testing.assert_array_equal(figure[ROW_SIZE[1] + PANEL_GAP : 2 * ROW_SIZE[1] + PANEL_GAP], rows[1])


@pytest.mark.timeout(300)
def test_visualize_ids_and_user_mistakes(models, tmp_path, capsys):
    cam_uri, irn_uri = models
    records, _ = load_records(SPEC)
    picked = [records[3].image_id, records[1].image_id]
    out = tmp_path / "picked"
    base = ["visualize", "--images", SPEC, "--irn", irn_uri, "--output", str(out)] + WALK  # CAM from the IRNet model
    assert main(base + ["--ids", ",".join(picked)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"000_{picked[0]}.png", f"001_{picked[1]}.png", FIGURE_NAME]
    )
    first = _png(out / f"000_{picked[0]}.png")
    np.testing.assert_array_equal(first[TITLE_HEIGHT:, :SIDE], load_synthetic(records[3].uri).image)
    capsys.readouterr()

    mistakes = {
        "unknown image id": base + ["--ids", f"{picked[0]},no-such-image"],
        "no model there": ["visualize", "--images", SPEC, "--irn", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")],
        "built-in data set spec": ["visualize", "--images", "builtin:bogus=1", "--irn", irn_uri,
                                   "--output", str(tmp_path / "y")],
        "image set not found": ["visualize", "--images", str(tmp_path / "no-set"), "--irn", irn_uri,
                                "--output", str(tmp_path / "z")],
    }  # fmt: skip
    for expected, argv in mistakes.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    # the unknown id wrote nothing new next to the earlier run
    assert len(list(out.iterdir())) == 3


def test_visualize_reports_an_unreadable_image_and_writes_nothing(models, tmp_path, capsys):
    _, irn_uri = models
    (tmp_path / "good.png").write_bytes(_encode(np.full((32, 40, 3), 90, np.uint8)))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "set.jsonl").write_text(
        '{"image": "good.png", "classes": ["checker"]}\n{"image": "broken.png", "classes": ["dots"]}\n'
    )
    out = tmp_path / "out"
    assert main(["visualize", "--images", str(tmp_path / "set.jsonl"), "--irn", irn_uri, "--output", str(out)] + WALK) == 2
    err = capsys.readouterr().err
    assert "broken (not_an_image" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["visualize", "--images", str(tmp_path / "set.jsonl"), "--irn", irn_uri, "--output", str(out),
                 "--ids", "good"] + WALK) == 0  # fmt: skip
    assert (_png(out / "000_good.png").shape[1], _png(out / "000_good.png").shape[0]) == (
        6 * 40 + 5 * PANEL_GAP, TITLE_HEIGHT + 32)


def _encode(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.timeout(180)
def test_visualize_writes_to_s3(models, s3_server, s3_bucket, s3_client):
    cam_uri, irn_uri = models
    records, _ = load_records(SPEC)
    prefix = f"s3://{s3_bucket}/panels/run1"
    argv = ["visualize", "--images", SPEC, "--cam", cam_uri, "--irn", irn_uri, "--output", prefix,
            "--ids", records[0].image_id, "--endpoint-url", s3_server] + WALK  # fmt: skip
    assert main(argv) == 0
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [f"panels/run1/000_{records[0].image_id}.png", f"panels/run1/{FIGURE_NAME}"]
    body = s3_client.get_object(Bucket=s3_bucket, Key=keys[0])["Body"].read()
    row = _png(io.BytesIO(body))
    assert (row.shape[1], row.shape[0]) == ROW_SIZE
    np.testing.assert_array_equal(row[TITLE_HEIGHT:, :SIDE], load_synthetic(records[0].uri).image)
