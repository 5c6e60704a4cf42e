"""tools/fusion_diagnosis.py: the open-gate mean of the gated maps."""

import numpy as np

from tools.fusion_diagnosis import open_gate_mean


def test_open_gate_mean_divides_by_the_networks_whose_gate_opened():
    maps = np.zeros((4, 2, 2, 3), dtype=np.float32)
    probabilities = np.array([[0.9, 0.1, 0.9], [0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.1, 0.9]])
    maps[0, ..., 0], maps[1, ..., 0] = 0.8, 0.4  # slice 0: two gates open
    maps[0, ..., 2], maps[2, ..., 2], maps[3, ..., 2] = 0.9, 0.6, 0.3  # slice 2: three open
    fused = open_gate_mean(maps, probabilities)
    assert np.allclose(fused[..., 0], 0.6) and np.allclose(fused[..., 2], 0.6)
    assert np.allclose(fused[..., 1], 0.0), "no gate open: the slice stays empty"
    assert np.allclose(maps.mean(0)[..., 0], 0.3), "the default's mean over all four halves it"
