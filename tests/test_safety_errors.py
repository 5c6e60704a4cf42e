"""Finding 6: clear messages, buried.

Every DataError sat in the middle of an 86-133-line traceback whose last line was MONAI's
`Failed to instantiate component ...`, and `--base_channels 0` or a file given as
--dataset_dir ended in raw tracebacks. Now the error hook installed by the configs'
`initialize` prints the project's error as the last line, on one line, with the fix.
"""

from __future__ import annotations

import sys

import pytest
import torch

from scripts.data.subjects import DataError
from scripts.model.networks import MultiModalCAM
from scripts.runtime import BundleError, _error_hook, install_error_hook, one_line, project_error
from tests.safety_data import bundle_command, last_line


def _wrapped(error: Exception) -> RuntimeError:
    """An error the way MONAI's config parser hands it on."""
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("Failed to instantiate component 'scripts.data.slices.SliceDataset'") from inner
    except RuntimeError as outer:
        return outer


def test_the_hook_prints_the_project_error_as_the_last_line(capsys):
    outer = _wrapped(DataError("subject X: cannot read t1 file /d/X_t1.nii.gz.\nFix: re-extract it."))
    assert isinstance(project_error(outer), DataError)
    _error_hook(type(outer), outer, outer.__traceback__, previous=lambda *a: pytest.fail("not the project's hook"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "DataError: subject X: cannot read t1 file /d/X_t1.nii.gz. Fix: re-extract it."
    assert len(lines) == 2  # one hint line about the hidden traceback, then the error


def test_other_errors_keep_their_traceback():
    seen = []
    other = _wrapped(ZeroDivisionError("division by zero"))
    _error_hook(type(other), other, other.__traceback__, previous=lambda *a: seen.append(a[1]))
    assert seen == [other] and project_error(other) is None
    assert one_line(BundleError("a\n  b")) == "BundleError: a b"


def test_installing_twice_keeps_one_hook(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_error_hook()
    hook = sys.excepthook
    install_error_hook()
    assert sys.excepthook is hook and hook is not sys.__excepthook__


@pytest.mark.parametrize("case", ["base_channels_0", "file_as_dataset_dir", "missing_dataset_dir",
                                  "no_subjects_at_inference"])
def test_command_line_mistakes_end_in_one_clear_last_line(case, tmp_path):
    train = ["training", "--config_file", "configs/train.yaml", "--ckpt_dir", str(tmp_path / "models")]
    if case == "base_channels_0":
        result = bundle_command(*train, "--base_channels", "0")
        expected = ("BundleError: --base_channels must be a positive integer, got 0. Fix: pass e.g. the config's "
                    "default (with a trained model: the value it was trained with).")
    elif case == "file_as_dataset_dir":
        scan = tmp_path / "BraTS19_X_t1.nii.gz"
        scan.write_bytes(b"\x1f\x8b")
        result = bundle_command(*train, "--dataset_dir", str(scan))
        expected = (f"DataError: --dataset_dir {scan} is a file, not a folder. Fix: pass the folder holding the "
                    f"subject folders, or a datalist .json file.")
    elif case == "missing_dataset_dir":
        result = bundle_command(*train, "--dataset_dir", str(tmp_path / "typo"))
        expected = (f"DataError: --dataset_dir {tmp_path / 'typo'} does not exist. Fix: check the path (the folder "
                    f"holding the subject folders), or pass --make_phantom true to generate the synthetic phantom "
                    f"there.")
    else:  # a DataError raised while MONAI instantiates the dataset
        (tmp_path / "empty").mkdir()
        torch.save(MultiModalCAM(["t1", "t1c", "t2", "flair"], base_channels=4).state_dict(), tmp_path / "model.pt")
        result = bundle_command("inference", "--config_file", "configs/inference.yaml", "--dataset_dir",
                                str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"), "--ckpt_path",
                                str(tmp_path / "model.pt"))
        expected = f"DataError: no subjects found under {tmp_path / 'empty'}. Looked for: BraTS 2018-2021:"
    assert result.returncode != 0
    assert last_line(result).startswith(expected), result.stderr[-2000:]
    assert "Failed to instantiate" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "typo").exists()
