"""Issue #33, the data layer: real-world folders that were taken wrongly or without a word.

Each test reproduces one finding of the issue on tiny volumes written here
(tests/safety_data.py) and checks the message a user now sees: a `DataError` (the last line
of the output) naming the subject, the file and the fix, or a warning with the numbers.

- case 3: hand-written datalists get the duplicate / leakage checks of folder discovery;
- cases 1, 4, 5: discovery reports every folder holding scans that it does not take, and why
  (this bundle's output folders, folders deeper than it looks, names it cannot read), and an
  unusable modality file (dangling or looping link, a folder) is an error, not "missing";
- case 11: a header without voxel size is an error, one without orientation a warning;
- case 12: the advice of the sanity warnings (labels > 0, tiny volumes) and the swaps or
  inversions that can be detected cheaply (a negated brain, T1 / T2 files swapped).

`BAD_FOLDERS` is a table for the next such case: a folder builder and the last line it must end in.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.datalist import ensure_dataset, write_datalist
from scripts.data.sanity import label_warnings, volume_warnings
from scripts.data.subjects import MAX_SEARCH_DEPTH, DataError, discover_subjects
from scripts.data.volumes import load_volume
from scripts.runtime import one_line
from tests.safety_data import SHAPE, write_dataset, write_subject

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- case 3: datalists


def _own_datalist(tmp_path: Path, edit) -> Path:
    """A datalist written by the user (no stored seed / split) from a 4-subject dataset, edited by `edit`."""
    data = write_dataset(tmp_path / "data", subjects=4)
    written = write_datalist(data, tmp_path / "ours.json", split=[2, 1, 1], seed=0)
    own = {s: [dict(e) for e in written[s]] for s in ("training", "validation", "testing")}
    for entries in own.values():  # paths relative to the new file's folder (the same folder)
        for entry in entries:
            entry.pop("grade", None)
    edit(own)
    path = tmp_path / "own.json"
    path.write_text(json.dumps(own))
    return path


LEAKS = {
    "duplicate": (lambda d: d["training"].append(dict(d["training"][0])),
                  "DataError: datalist {json}: subject {a} is listed twice in 'training'"),
    "train_and_validation": (lambda d: d["validation"].append(dict(d["training"][0])),
                             "DataError: datalist {json}: subject {a} is in both 'training' and 'validation'"),
    "test_also_training": (lambda d: d["testing"].append(dict(d["training"][1])),
                           "DataError: datalist {json}: subject {b} is in both 'training' and 'testing'"),
    "same_files_two_ids": (lambda d: d["testing"].append({**d["training"][0], "subject": "Renamed"}),
                           "DataError: datalist {json}: file {file} is listed for subject {a} ('training') and for "
                           "subject Renamed ('testing')"),
}


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_a_hand_written_datalist_gets_the_leakage_checks(tmp_path, case):
    edit, expected = LEAKS[case]
    path = _own_datalist(tmp_path, edit)
    own = json.loads(path.read_text())
    a, b = own["training"][0]["subject"], own["training"][1]["subject"]
    first_file = str((tmp_path / own["training"][0]["t1"]).resolve())
    for given in ({"dataset_dir": path}, {"dataset_dir": tmp_path / "data", "datalist": path}):
        with pytest.raises(DataError) as caught:
            ensure_dataset(**given, make_phantom=False)
        line = one_line(caught.value)
        assert line.startswith(expected.format(json=path, a=a, b=b, file=first_file)), line
        assert "Fix: " in line


def test_a_clean_hand_written_datalist_still_passes(tmp_path):
    path = _own_datalist(tmp_path, lambda d: None)
    assert ensure_dataset(path, make_phantom=False) == str(path)


# --------------------------------------------------------------------------- cases 1, 4, 5: discovery


def test_subjects_deeper_than_three_levels_are_found_and_deeper_ones_reported(tmp_path, caplog):
    write_subject(tmp_path / "deep", "P1")
    write_subject(tmp_path / "deep" / "site1" / "scanner" / "batch", "P2")  # 4 levels below the root
    too_deep = tmp_path / "deep" / "/".join(f"l{i}" for i in range(MAX_SEARCH_DEPTH))
    write_subject(too_deep, "P3")
    with caplog.at_level(logging.WARNING, logger="scripts.data.subjects"):
        records = discover_subjects(tmp_path / "deep")
    assert [r["subject"] for r in records] == ["P1", "P2"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"skipped folder {too_deep / 'P3'}: it is {MAX_SEARCH_DEPTH + 1} folder levels below "
                              f"{tmp_path / 'deep'} (subjects are looked for at most {MAX_SEARCH_DEPTH} levels down) "
                              f"but holds 5 image files"), warning
    assert "Fix: pass a folder closer to it as --dataset_dir" in warning


def test_an_output_folder_of_this_bundle_is_never_read_as_subjects(tmp_path, caplog):
    write_subject(tmp_path / "data", "Case01")
    outputs = tmp_path / "data" / "results"
    write_subject(outputs, "Case01_cam")  # what <id>_cam_{t1,t1c,t2,flair}.nii.gz looked like to discovery
    (outputs / ".manifest.json").write_text(json.dumps({"version": 2, "files": {}}))
    with caplog.at_level(logging.WARNING, logger="scripts.data.subjects"):
        records = discover_subjects(tmp_path / "data")
    assert [r["subject"] for r in records] == ["Case01"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"skipped folder {outputs}: it holds this bundle's outputs (.manifest.json)")
    with pytest.raises(DataError) as caught:
        discover_subjects(outputs)
    assert one_line(caught.value).startswith(f"DataError: {outputs} is an output folder of this bundle "
                                             f"(it holds .manifest.json), not input data. Fix: ")


def _unusable(kind: str, folder: Path) -> Path:
    target = folder / "Sub_000_t1.nii.gz"
    target.unlink()
    if kind == "dangling_link":
        target.symlink_to(folder / ".git" / "annex" / "objects" / "XX" / "SHA256E-s1--abc.nii.gz")
    elif kind == "link_loop":
        target.symlink_to(target.name)
    else:
        target.mkdir()
    return target


UNUSABLE = {
    "dangling_link": "is a link to a file that does not exist",
    "link_loop": "is a link that points back to itself",
    "directory": "is a folder, not a file",
}


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
@pytest.mark.parametrize("allow_missing", [False, True])  # inference discovers with allow_missing
def test_an_unusable_modality_file_is_an_error_not_a_missing_modality(tmp_path, kind, allow_missing):
    folder = write_subject(tmp_path / "data", "Sub_000")
    target = _unusable(kind, folder)
    with pytest.raises(DataError) as caught:
        discover_subjects(tmp_path / "data", allow_missing=allow_missing)
    line = one_line(caught.value)
    assert line.startswith(f"DataError: subject Sub_000: t1 file {target} {UNUSABLE[kind]}"), line
    assert "Fix: " in line


def test_a_file_name_the_parser_does_not_take_is_reported(tmp_path, caplog):
    folder = write_subject(tmp_path / "data", "Sub02")
    (folder / "Sub02_flair.nii.gz").rename(folder / "Sub02.flair.nii.gz")
    (folder / "notes.txt").write_text("not an image: no word about it")
    odd = write_subject(tmp_path / "data", "Sub03")
    for path in odd.iterdir():  # a folder none of whose scans is named like a modality
        path.rename(odd / path.name.replace("Sub03_", "scan."))
    with caplog.at_level(logging.WARNING, logger="scripts.data.subjects"):
        records = discover_subjects(tmp_path / "data", allow_missing=True)
    assert [r["subject"] for r in records] == ["Sub02"] and "flair" not in records[0]["images"]
    warnings = sorted(warnings_of(caplog))  # "skipped folder ..." before "subject ..."
    assert len(warnings) == 2, warnings
    assert warnings[1].startswith(f"subject Sub02: file {folder / 'Sub02.flair.nii.gz'} is not used: its name gives "
                                  f"no modality"), warnings[1]
    assert warnings[0].startswith(f"skipped folder {odd}: it holds 5 image files but none is named like a modality "
                                  f"file (e.g. scan.flair.nii.gz)"), warnings[0]


# --------------------------------------------------------------------------- case 11: headers


def _patched_nifti(path: Path, pixdim=None, codes=None) -> Path:
    """Write a brain volume, then patch its raw header bytes (nibabel repairs pixdim 0 on save)."""
    volume = np.zeros(SHAPE, np.float32)
    volume[2:14, 2:14, 1:7] = 100.0
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = np.frombuffer(raw[:348], dtype=nib.Nifti1Header().structarr.dtype).copy()
    if pixdim is not None:
        header["pixdim"][0][1:4] = pixdim
    if codes is not None:
        header["qform_code"], header["sform_code"] = codes
    raw[:348] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def test_a_voxel_size_of_zero_is_an_error_naming_the_axis(tmp_path):
    path = _patched_nifti(tmp_path / "Sub_t1.nii.gz", pixdim=[2.0, 0.0, 2.0], codes=(1, 0))
    with pytest.raises(DataError) as caught:
        load_volume(str(path), "Sub", "t1")
    line = one_line(caught.value)
    assert line.startswith(f"DataError: subject Sub: t1 file {path} has voxel size 0 along axis 1 in its header "
                           f"(pixdim 2, 0, 2 mm); read as 1 mm, the brain would be rescaled"), line
    assert "Fix: write the voxel size into the header" in line
    sform = _patched_nifti(tmp_path / "Sub_t2.nii.gz", pixdim=[2.0, 0.0, 2.0], codes=(0, 1))
    with pytest.raises(DataError, match="along axis 1"):  # MONAI's reader rescales an sform to pixdim too
        load_volume(str(sform), "Sub", "t2")


def test_a_header_without_orientation_is_a_warning(tmp_path, caplog):
    path = _patched_nifti(tmp_path / "Sub_t1.nii.gz", codes=(0, 0))
    with caplog.at_level(logging.WARNING):
        load_volume(str(path), "Sub", "t1")
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"subject Sub: t1 file {path} has no orientation in its header (qform_code and "
                              f"sform_code 0): it is read with nibabel's fallback"), warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_volume(str(_patched_nifti(tmp_path / "ok_t1.nii.gz")), "Ok", "t1")
    assert warnings_of(caplog) == []


# --------------------------------------------------------------------------- case 12: advice, swaps


def _volume(array, affine=AFFINE) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(array, np.float32))[None], affine=torch.as_tensor(affine))


def test_the_label_warning_says_what_is_taken_as_tumour():
    seg = np.zeros(SHAPE, np.int16)
    seg[6:10, 6:10, 3:6] = 1
    seg[0, 0, :2] = -1
    (message,) = label_warnings(torch.as_tensor(seg), "s_seg.nii.gz", "S", "brats2018-2021", log=False)
    assert "-1 (2 voxels)" in message
    assert "labels above 0 are taken as tumour, labels below 0 as background" in message
    assert "every non-zero label" not in message


def test_a_tiny_volume_is_not_blamed_on_skull_stripping():
    tiny = np.random.default_rng(0).uniform(10.0, 100.0, (10, 10, 10))
    (message,) = volume_warnings({"t1": _volume(tiny)}, {"t1": "tiny.nii.gz"}, "T", log=False)
    assert message.startswith("subject T: 100.0 % of the voxels are non-zero (no zero background)"), message
    assert ("(a crop or a test file? t1 file tiny.nii.gz is 10 x 10 x 10 voxels (20 x 20 x 20 mm), far smaller than "
            "a head (150-200 mm))") in message
    assert "not skull-stripped?" not in message


def _brain_with_tissues(order: str) -> np.ndarray:
    """A brain box of 'white matter' (most voxels), 'grey matter' and a little 'CSF'."""
    volume = np.zeros((40, 40, 20), np.float32)
    volume[4:36, 4:36, 2:18] = 100.0 if order == "t1" else 40.0  # WM: bright in T1, dark in T2
    volume[4:36, 4:9, 2:18] = 70.0  # GM
    volume[18:22, 18:22, 2:18] = 20.0 if order == "t1" else 200.0  # CSF: dark in T1, bright in T2
    return volume


def test_swapped_t1_and_t2_files_are_named():
    t1, t2 = _volume(_brain_with_tissues("t1")), _volume(_brain_with_tissues("t2"))
    files = {"t1": "S_t1.nii.gz", "t2": "S_t2.nii.gz"}
    assert volume_warnings({"t1": t1, "t2": t2}, files, "S", log=False) == []
    (message,) = volume_warnings({"t1": t2, "t2": t1}, files, "S", log=False)
    assert message.startswith("subject S: the t1 file S_t1.nii.gz looks like a T2 and the t2 file S_t2.nii.gz like a "
                              "T1 (brain intensity skewness t1 "), message
    assert "are the t1 and t2 files swapped?" in message


def test_an_inverted_brain_is_named():
    brain = _brain_with_tissues("t1")
    (message,) = volume_warnings({"t1": _volume(-brain)}, {"t1": "S_t1.nii.gz"}, "S", log=False)
    assert message.startswith("subject S: t1 file S_t1.nii.gz has 100.0 % negative values in its brain (MR magnitude "
                              "images are >= 0)"), message


# --------------------------------------------------------------------------- probes for the next case

# A folder builder (tmp_path -> the folder to discover) and the start of the last line it must end in.
BAD_FOLDERS = {
    "no_subject": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "DataError: no subjects found under"),
    "a_file": (lambda tmp: (tmp / "f.nii.gz").write_bytes(b"x") and tmp / "f.nii.gz", "DataError: data folder"),
    "dangling_seg": (lambda tmp: _dangle(write_subject(tmp, "S1") / "S1_seg.nii.gz"),
                     "DataError: subject S1: seg file"),
}


def _dangle(path: Path) -> Path:
    path.unlink()
    path.symlink_to(path.with_name("gone.nii.gz"))
    return path.parent


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_end_in_their_line(tmp_path, case):
    build, expected = BAD_FOLDERS[case]
    with pytest.raises(DataError) as caught:
        discover_subjects(build(tmp_path))
    assert one_line(caught.value).startswith(expected), one_line(caught.value)
