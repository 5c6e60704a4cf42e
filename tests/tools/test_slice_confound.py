"""tools/slice_confound.py: the accuracy of slice-position shortcuts on a dataset with segmentations."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from tools.slice_confound import best_threshold_accuracy, best_window_accuracy, main, slice_table


def _subject(folder, name, tumour_slices, depth=20):
    folder.mkdir(parents=True)
    image = np.zeros((6, 6, depth), np.float32)
    image[1:5, 1:5, 2:depth - 2] = 1.0  # brain on slices 2 .. depth-3
    seg = np.zeros(image.shape, np.uint8)
    seg[2, 2, list(tumour_slices)] = 2
    for suffix, array in {"t1": image, "t1ce": image, "t2": image, "flair": image, "seg": seg}.items():
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(folder / f"{name}_{suffix}.nii.gz"))


def test_a_mid_brain_tumour_is_guessed_from_the_slice_height(tmp_path, capsys):
    for i in range(3):
        _subject(tmp_path / "HGG" / f"S{i}", f"S{i}", tumour_slices=range(8, 12))
    assert main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "48 brain slices, 25.0 % with tumour" in out
    assert "| majority class (always 'healthy') | 75.0 |" in out
    assert "| one threshold on brain area | 75.0 |" in out  # every slice has the same area: no cue
    assert "| one window on relative height (0.35-0.60) | 100.0 |" in out  # slices 8-11 of 2-17: 0.40-0.60


def test_shortcut_accuracies():
    label = np.array([0, 0, 1, 1, 0], bool)
    assert best_threshold_accuracy(np.array([1, 2, 3, 4, 5.0]), label) == 0.8
    assert best_threshold_accuracy(np.array([5, 4, 1, 1, 3.0]), label) == 1.0  # "below" rules count too
    accuracy, low, high = best_window_accuracy(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), label)
    assert accuracy == 1.0 and 0.25 < low <= 0.5 and high == 0.75


def test_table_skips_subjects_without_segmentation(tmp_path):
    _subject(tmp_path / "HGG" / "S0", "S0", tumour_slices=[5])
    record = {"subject": "S0", "images": {"t1": str(tmp_path / "HGG/S0/S0_t1.nii.gz")}, "seg": None}
    assert len(slice_table([record], "t1")["label"]) == 0
