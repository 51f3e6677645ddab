"""The benchmark suite (irnet_ray.suite, `irnet-ray benchmark`): each family changes the data
it says it stresses and nothing of the method; the targets are judged right; a smoke run of one
family goes through every stage on Ray and fills its row."""

from __future__ import annotations

import dataclasses

import pytest

from irnet_ray.cli import main
from irnet_ray.demo import DemoConfig
from irnet_ray.suite import FAMILIES, SUITE_DATA, family_config, format_suite, meets_targets, run_suite


def test_families_change_their_data_only_and_keep_the_method_settings():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) >= 5 and "demo" in names  # four stress families and the demo
    demo = DemoConfig()
    for family in FAMILIES:
        config = family_config(family, seed=7)
        for field in ("backbone", "cam_inference", "relations", "synthesis"):
            assert getattr(config, field) == getattr(demo, field), (family.name, field)
        assert dataclasses.replace(config.cam_train, seed=demo.cam_train.seed) == demo.cam_train
        assert dataclasses.replace(config.irn_train, seed=demo.irn_train.seed) == demo.irn_train
        assert config.cam_train.seed == config.irn_train.seed == config.data.seed == 7
        base = demo.data if family.name == "demo" else SUITE_DATA
        changed = {f.name for f in dataclasses.fields(base) if getattr(config.data, f.name) != getattr(base, f.name)}
        assert changed == set(family.data) | {"seed"}, family.name
    data = {f.name: family_config(f).data for f in FAMILIES}
    assert data["demo"] == dataclasses.replace(demo.data, seed=0)
    assert max(data["small-parts"].mark_fraction) < min(SUITE_DATA.mark_fraction)
    assert data["textureless"].noise_std == 0 and data["textureless"].num_background_blobs == (0, 0)
    assert data["clutter"].num_distractors[0] > SUITE_DATA.num_distractors[1]
    assert data["touching"].touching_probability > SUITE_DATA.touching_probability
    assert data["scales"].image_size[0] > SUITE_DATA.image_size[0]


def test_targets_are_the_papers_gains():
    row = {"cam_miou": 40.0, "pseudo_miou": 55.0, "cam_cc_ap50": 10.0, "ap50": 40.0}
    assert meets_targets(row) == {"miou_gain": True, "ap50_ratio": True}
    assert meets_targets({**row, "pseudo_miou": 54.9, "ap50": 39.9}) == {"miou_gain": False, "ap50_ratio": False}
    assert meets_targets({**row, "cam_cc_ap50": 0.0, "ap50": 0.0})["ap50_ratio"] is False  # nothing found is no win
    assert meets_targets({**row, "cam_cc_ap50": 0.0, "ap50": 3.0})["ap50_ratio"] is True
    assert meets_targets({"cam_miou": None})["miou_gain"] is None
    table = format_suite({"rows": [{"family": "touching", **row, "cam_cc_ap70": 1.0, "boundary_cc_ap50": 20.0,
                                    "boundary_cc_ap70": 5.0, "ap70": 12.5}]})  # fmt: skip
    assert "| touching | 40.0 | 55.0 | +15.0 | 10.0 / 1.0 | 20.0 / 5.0 | 40.0 / 12.5 | 4.0x | gain>=15 yes ratio>=4 yes |" in table


def test_unknown_families_are_refused(capsys):
    with pytest.raises(ValueError, match="unknown benchmark family nope; known: demo"):
        run_suite(["nope"], "unused")
    assert main(["benchmark", "--families", "demo,nope"]) == 2
    assert "--families must name some of" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_a_smoke_run_of_the_demo_family_fills_its_row(ray_cluster, tiny_demo_root):
    """The suite's smoke run of its ``demo`` family (CI's smoke version of the suite). Its settings
    are test_demo's tiny demo, whose outputs it finds in ``tiny_demo_root`` after that test and
    resumes from; run alone, it runs every stage itself."""
    lines: list[str] = []
    result = run_suite(["demo"], str(tiny_demo_root), smoke=True, seed=3, log=lines.append)
    [row] = result["rows"]
    assert row["family"] == "demo" and row["images"] == 12 and row["image_size"] == [64, 64]
    for key in ("cam_miou", "pseudo_miou", "cam_cc_ap50", "cam_cc_ap70", "boundary_cc_ap50", "boundary_cc_ap70",
                "ap50", "ap70"):  # fmt: skip
        assert 0.0 <= row[key] <= 100.0, key
    assert set(row["targets"]) == {"miou_gain", "ap50_ratio"}
    assert "\n| demo | " in "\n".join(lines)  # the table so far, after each family
    assert (tiny_demo_root / "demo").is_dir()
