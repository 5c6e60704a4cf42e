"""tools/mask_slice_accuracy.py: the slice accuracy a model's masks imply."""

from __future__ import annotations

import re

import numpy as np
import torch

from scripts.data.datalist import main as datalist_main
from scripts.data.phantom.__main__ import main as phantom_main
from scripts.model.networks import MultiModalCAM
from tools.mask_slice_accuracy import main, slice_accuracy


def test_slice_accuracy_counts_brain_slices_with_enough_mask_pixels():
    truth = np.zeros((4, 4, 5), bool)
    truth[0, 0, 1] = truth[:2, :2, 2] = True  # tumour on slices 1 and 2
    mask = np.zeros_like(truth)
    mask[:, :, 2] = True  # 16 pixels on slice 2
    mask[0, :2, 3] = True  # 2 pixels on slice 3 (healthy)
    brain = np.array([False, True, True, True, True])  # slice 0 holds no brain: not counted
    assert slice_accuracy(mask, truth, brain, 1) == (2, 4)  # slice 1 missed, slice 3 a false alarm
    assert slice_accuracy(mask, truth, brain, 3) == (3, 4)  # 2 pixels no longer make slice 3 'tumour'
    assert slice_accuracy(mask, truth, brain, 17) == (2, 4)  # slice 2 missed as well


def test_the_tool_prints_one_row_per_modality(tmp_path, capsys):
    data = tmp_path / "data"
    assert phantom_main(["--out", str(data), "--subjects", "4", "--seed", "0", "--spacing", "6"]) == 0
    assert datalist_main(["datalist", "--data", str(data), "--out", str(data / "datalist.json")]) == 0
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    net = MultiModalCAM(["t1", "flair"], base_channels=4, spacing=[6.0] * 3, spatial_size=[40, 40])
    torch.save(net.state_dict(), ckpt)
    capsys.readouterr()
    assert main(["--ckpt", str(ckpt), "--dataset_dir", str(data), "--cache_dir", str(tmp_path / "cache"),
                 "--split", "training", "--method", "softmax", "--gate", "false", "--min_pixels", "1", "400"]) == 0
    out = capsys.readouterr().out
    header = re.search(r"(\d+) brain slices, ([\d.]+) % with tumour; majority class ([\d.]+) %", out)
    assert header and float(header.group(3)) >= 50.0
    rows = re.findall(r"^\| (t1|flair) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["t1", "flair"]
    for _, *cells in rows:
        assert all(0.0 <= float(c) <= 100.0 for c in cells)
