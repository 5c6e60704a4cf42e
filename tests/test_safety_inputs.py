"""Finding 2: mistakes accepted silently.

A mistyped --dataset_dir generated a phantom there and trained on it, an unknown override
(`--epoch 3`) was ignored, and datalist.json was reused after subjects were added or the
split changed. Now: unknown keys are an error naming the closest key, a missing data folder
is an error unless --make_phantom (or the bundle's own data/phantom), and a datalist that
no longer matches the data or the split is refused with what changed.
"""

from __future__ import annotations

import json

import pytest

from scripts.data import datalist as datalists, subjects
from scripts.data.subjects import DataError
from scripts.data.datalist import ensure_dataset
from scripts.runtime import BundleError, as_flag, check_command_line, check_overrides, command_line_keys
from tests.safety_data import EVALUATE, TRAIN, bundle_command, last_line, write_dataset, write_subject

MAIN = "/env/lib/python3.11/site-packages/monai/bundle/__main__.py"


def test_an_unknown_override_key_names_the_closest_known_key():
    with pytest.raises(BundleError, match=r"unknown setting --epoch .*Fix: did you mean --epochs\?"):
        check_overrides([TRAIN], ["epoch"])
    with pytest.raises(BundleError, match="did you mean --train#trainer#max_epochs"):
        check_overrides([TRAIN], ["train#trainer#max_epoch"])
    check_overrides([TRAIN], ["epochs", "train#trainer#max_epochs", "phantom#subjects", "+imports"])
    # a new argument of a component that takes it (MONAI passes it on) is not a typo
    check_overrides([TRAIN], ["train#trainer#epoch_length", "validate#dataloader#pin_memory",
                              "train#report_handlers#0#_disabled_"])
    with pytest.raises(BundleError, match="unknown setting --volume_cache#memory_item "):
        check_overrides([TRAIN], ["volume_cache#memory_item"])  # VolumeCache has no such argument
    check_overrides([TRAIN, EVALUATE], ["eval_split", "overwrite", "method"])  # merged files


def test_the_command_line_is_read_as_fire_reads_it():
    argv = ["run", "training", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--epochs=2",
            "--overwrite", "--dataset_dir", "/d", "--threshold", "-0.5"]
    assert command_line_keys(argv) == {"config_file": "['configs/train.yaml','configs/evaluate.yaml']",
                                       "epochs": "2", "overwrite": None, "dataset_dir": "/d", "threshold": "-0.5"}
    with pytest.raises(BundleError, match="--tresholds"):
        check_command_line([MAIN, "run", "evaluating", "--config_file", str([TRAIN, EVALUATE]), "--tresholds", "1"])
    check_command_line([MAIN, "run", "training", "--config_file", TRAIN, "--epochs", "1", "--meta_file", "m.json"])
    check_command_line(["pytest", "--whatever"])  # not a bundle command line: nothing to check


def test_unknown_key_on_the_real_command_line_is_the_last_line(tmp_path):
    result = bundle_command("training", "--config_file", "configs/train.yaml", "--epoch", "3",
                            "--ckpt_dir", str(tmp_path / "models"))
    assert result.returncode != 0
    assert last_line(result) == ("BundleError: unknown setting --epoch (no such entry in configs/train.yaml). "
                                 "Fix: did you mean --epochs?")
    assert not (tmp_path / "models").exists()  # refused before anything was created


def test_a_missing_dataset_dir_is_an_error_unless_a_phantom_is_asked_for(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datalists, "_generate_phantom", lambda target, options: calls.append(target))
    typo = tmp_path / "MICCAI_BraTS_2019_Data_Trainnig"
    with pytest.raises(DataError, match=r"does not exist\. Fix: check the path .*--make_phantom true"):
        ensure_dataset(typo, make_phantom=False)
    with pytest.raises(DataError, match=r"is empty\."):
        (tmp_path / "empty").mkdir()
        ensure_dataset(tmp_path / "empty", make_phantom="false")  # as `--make_phantom false` arrives
    assert calls == [] and not typo.exists()
    with pytest.raises(Exception):  # the stub generated nothing, so no subject is found afterwards
        ensure_dataset(typo, make_phantom="true")
    assert calls == [typo]
    assert datalists.same_path(tmp_path / "x" / ".." / "data", tmp_path / "data")
    with pytest.raises(BundleError, match="--make_phantom must be true or false"):
        as_flag("maybe", "make_phantom")


def test_a_file_given_as_dataset_dir_is_a_clear_error(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not a folder")
    with pytest.raises(DataError, match="is a file, not a folder"):
        ensure_dataset(scan, make_phantom=False)
    with pytest.raises(DataError, match="is a file, not a folder.*--files"):
        subjects.discover_subjects(scan)


def test_a_datalist_is_not_reused_after_subjects_are_added_or_the_split_changes(tmp_path):
    data = write_dataset(tmp_path / "data", subjects=4)
    listing = ensure_dataset(data, split=[2, 1, 1], seed=0, make_phantom=False)
    stored = json.loads(open(listing).read())
    assert stored["split"] == {"training": 2, "validation": 1, "testing": 1} and stored["seed"] == 0
    assert ensure_dataset(data, split=[0.5, 0.25, 0.25], seed=0, make_phantom=False) == listing  # same split
    with pytest.raises(DataError, match=r"--split \[3, 0, 1\] gives .*Fix: delete it"):
        ensure_dataset(data, split=[3, 0, 1], seed=0, make_phantom=False)
    with pytest.raises(DataError, match="--seed 5 differs"):
        ensure_dataset(data, split=[2, 1, 1], seed=5, make_phantom=False)
    write_subject(data, "Sub_new")
    with pytest.raises(DataError, match=r"the data changed \(1 new subject\(s\) \['Sub_new'\], 0 removed"):
        ensure_dataset(data, split=[2, 1, 1], seed=0, make_phantom=False)
    # A datalist written by the user (no stored split) is the user's choice: used as it is.
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"training": stored["training"], "validation": [], "testing": []}))
    assert ensure_dataset(data, datalist=own, make_phantom=False) == str(own)
