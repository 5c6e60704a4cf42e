"""The seed plumbing of tools.experiments: which runs each seed gets, folders, overrides (no training)."""

from pathlib import Path

import pytest

from scripts.data.datalist import write_datalist
from tools import experiment_plan as plan_mod
from tools import experiments as ex

MAIN = ("cmer", "stage2", "stage2_all", "cam", "seam_all", "seam_scale", "full_supervision")
FIRST_ONLY = ("kd_only", "kd_er", "er_cmer", "cmer_deeplab", "cmer_t1_t2", "cmer_t1c_flair", "cmer_t1_flair",
              "cmer_t1c_t2", "cmer_flip", "cmer_rotation", "cmer_scale", "cmer_translation", "cmer+per_sample_sum",
              "cmer+mask_out_of_field", "cam_two_view", "cmer_identity")


def test_main_rows_run_for_every_seed_the_rest_for_the_first():
    plan = plan_mod.full_plan((3, 1, 2))
    seeds_of = {}
    for run in plan.runs:
        seeds_of.setdefault(run.name, []).append(run.seed)
    assert set(seeds_of) == set(MAIN) | set(FIRST_ONLY)
    for name in MAIN:
        assert seeds_of[name] == [3, 1, 2]
    for name in FIRST_ONLY:
        assert seeds_of[name] == [3]
    assert len(plan.runs) == 3 * len(MAIN) + len(FIRST_ONLY)
    assert len({r.key for r in plan.runs}) == len(plan.runs)
    # each seed's CMER, its two stage-2 runs (they need its model.pt) and the baselines come first
    assert [r.key for r in plan.runs[:7]] == ["seed3/cmer", "seed3/stage2", "seed3/stage2_all", "seed3/cam",
                                             "seed3/seam_all", "seed3/seam_scale", "seed1/cmer"]
    # full supervision (the last main row) comes before every one-seed run
    keys = [r.key for r in plan.runs]
    assert keys[18:21] == ["seed3/full_supervision", "seed1/full_supervision", "seed2/full_supervision"]
    stage2 = [r for r in plan.runs if r.name.startswith("stage2")]
    assert all(r.stage1 == "cmer" for r in stage2)
    assert dict(next(r for r in plan.runs if r.name == "stage2_all").overrides) == {"pseudo_modalities": None}
    assert dict(next(r for r in plan.runs if r.name == "cmer_deeplab").overrides) == {"backbone": "deeplab"}
    assert dict(next(r for r in plan.runs if r.name == "cmer_rotation").overrides) == {"transforms#kinds": ["rotation"]}
    # the controls: CAM's L_C on both views without ER; CMER's terms with pi = identity
    two_view = next(r for r in plan.runs if r.name == "cam_two_view")
    assert two_view.method == "cam" and dict(two_view.overrides)["transforms#kinds"] == list(plan_mod.TRANSFORM_KINDS)
    assert dict(next(r for r in plan.runs if r.name == "cmer_identity").overrides) == {"transforms#kinds": ["identity"]}
    assert set(plan.readouts) == {"cam", "seam_scale", "seam_all", "cmer"}  # GradCAM++ on the same networks


def test_quick_plan_defaults_to_one_seed():
    plan = plan_mod.quick_plan()
    assert plan.seeds == plan_mod.QUICK_SEEDS == (0,)
    assert [r.key for r in plan.runs] == ["seed0/cam", "seed0/seam_all", "seed0/cmer", "seed0/stage2",
                                         "seed0/cmer_t1_t2"]
    assert {r.seed for r in plan_mod.quick_plan((4, 5)).runs} == {4, 5}
    assert plan_mod.full_plan().seeds == plan_mod.DEFAULT_SEEDS == (0, 1, 2)


def test_each_seed_gets_its_own_phantom_split_cache_and_run_folders(tmp_path):
    overrides = [plan_mod.seed_overrides(s, tmp_path) for s in (0, 1, 2)]
    for key in ("seed", "phantom#seed", "dataset_dir", "cache_dir"):
        assert len({o[key] for o in overrides}) == 3, key
    assert overrides[1]["seed"] == overrides[1]["phantom#seed"] == 1
    assert overrides[1]["dataset_dir"] == str(tmp_path / "data" / "seed1")
    assert overrides[1]["cache_dir"] == str(tmp_path / "cache" / "seed1")
    assert all(o["make_phantom"] is True and "datalist_path" not in o for o in overrides)
    run = plan_mod.Run("cmer", "cmer", seed=2)
    assert plan_mod.run_dir(tmp_path, run) == tmp_path / "runs" / "seed2" / "cmer"


def test_fixed_data_varies_only_the_training_seed_and_the_split(tmp_path):
    data = tmp_path / "brats"
    overrides = [plan_mod.seed_overrides(s, tmp_path / "out", str(data)) for s in (0, 1)]
    assert overrides[0]["dataset_dir"] == overrides[1]["dataset_dir"] == str(data.resolve())
    assert "phantom#seed" not in overrides[0] and "make_phantom" not in overrides[0]
    assert [o["seed"] for o in overrides] == [0, 1]
    assert overrides[0]["datalist_path"] != overrides[1]["datalist_path"]
    assert overrides[1]["datalist_path"] == str(tmp_path / "out" / "splits" / "seed1" / "datalist.json")
    datalist = tmp_path / "given.json"
    datalist.write_text("{}")
    assert "datalist_path" not in plan_mod.seed_overrides(1, tmp_path, str(datalist))  # its own split, kept


def test_the_seed_key_is_the_split_seed(tmp_path):
    # the configs pass `seed` to ensure_dataset as the split seed: two seeds, two test sets
    records = [{"subject": f"s{i:02d}", "grade": "HGG" if i % 2 else "LGG",
                "images": {"t1": str(tmp_path / f"s{i:02d}_t1.nii.gz")}, "seg": None} for i in range(20)]
    written = [write_datalist(records, tmp_path / f"d{s}.json", (0.6, 0.2, 0.2), seed=s) for s in (0, 1)]
    tests = [{e["subject"] for e in d["testing"]} for d in written]
    assert len(tests[0]) == len(tests[1]) == 4 and tests[0] != tests[1]


def test_run_overrides_layer_the_seed_over_set_and_the_run_over_both(tmp_path):
    plan = plan_mod.full_plan((5,))
    plan.overrides = {"epochs": 1, "backbone": "unet"}
    run = next(r for r in plan.runs if r.name == "cmer_deeplab")
    overrides = plan_mod.run_overrides(run, plan, tmp_path, {"bundle_root": "/b"})
    assert overrides["epochs"] == 1 and overrides["backbone"] == "deeplab" and overrides["seed"] == 5
    assert overrides["bundle_root"] == "/b" and overrides["phantom#seed"] == 5


def test_set_may_not_change_a_seeded_key(tmp_path):
    with pytest.raises(SystemExit):
        ex.main(["--out", str(tmp_path), "--set", "seed=3"])


def test_selected_names_runs_by_name_or_by_seed():
    plan = plan_mod.full_plan((0, 1))
    assert [r.key for r in plan_mod.selected(plan, {"cmer"})] == ["seed0/cmer", "seed1/cmer"]
    assert [r.key for r in plan_mod.selected(plan, {"seed1/cam", "kd_only"})] == ["seed1/cam", "seed0/kd_only"]
    assert len(plan_mod.selected(plan)) == len(plan.runs)


def test_every_method_file_of_the_plan_exists():
    for run in plan_mod.full_plan().runs:
        assert (Path(ex.BUNDLE_ROOT) / "configs" / "methods" / f"{run.method}.yaml").is_file()


def test_the_deeplab_row_builds_a_deeplab_network_from_the_configs():
    from monai.bundle import ConfigParser

    from scripts.model.networks import DeepLabCAM

    run = next(r for r in plan_mod.full_plan().runs if r.name == "cmer_deeplab")
    parser = ConfigParser()
    parser.read_config([str(Path(ex.BUNDLE_ROOT) / f) for f in ("configs/train.yaml", "configs/methods/cmer.yaml")])
    parser.update({**dict(run.overrides), "base_channels": 4, "bundle_root": str(ex.BUNDLE_ROOT)})
    network = parser.get_parsed_content("network_def")
    assert all(isinstance(net, DeepLabCAM) for net in network.nets)


def test_the_recorded_command_is_quoted_with_relative_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    command = ex.command_line(["--out", str(tmp_path / "results"), "--set", "spatial_size=[40,40]"])
    assert command == "python -m tools.experiments --out results --set 'spatial_size=[40,40]'"
