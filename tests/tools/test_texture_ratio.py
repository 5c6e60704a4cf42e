"""tools.texture_ratio: tumour / normal-brain roughness ratios."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage as ndi

from tools.texture_ratio import main, texture_ratios


def _brain_with_tumour(tumour_noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (48, 48, 6)
    x, y = np.mgrid[:48, :48]
    brain = np.repeat(((x - 24) ** 2 + (y - 24) ** 2 < 20**2)[..., None], 6, axis=2)
    truth = np.repeat(((x - 24) ** 2 + (y - 28) ** 2 < 7**2)[..., None], 6, axis=2)
    background = ndi.gaussian_filter(rng.standard_normal(shape), (1.0, 1.0, 0)) + 0.3 * rng.standard_normal(shape)
    channel = background + 2.0 * truth + tumour_noise * rng.standard_normal(shape) * truth
    return np.stack([channel * brain, background * brain]), truth


def test_rough_tumour_reads_above_one_and_a_plain_one_near_the_brain():
    image, truth = _brain_with_tumour(tumour_noise=1.5)
    ratios = texture_ratios(image, truth)
    assert ratios[0]["res"] > 2.0 and ratios[0]["band"] > 1.5  # speckle added inside the tumour
    assert 0.8 < ratios[1]["res"] < 1.25 and 0.8 < ratios[1]["band"] < 1.25  # the same texture inside as outside
    assert texture_ratios(image, np.zeros_like(truth)) is None


def test_cli_on_a_small_phantom_and_a_folder_without_segmentations(tmp_path, capsys):
    from scripts.data import phantom

    phantom.generate_dataset(tmp_path / "data", 2, 3, spacing=4.0)
    out = tmp_path / "ratios.json"
    assert main(["--data", str(tmp_path / "data"), "--spacing", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["subjects"]) == 2 and set(result["summary"]) == {"t1", "t1c", "t2", "flair"}
    assert all(value > 0 for s in result["subjects"].values() for m in s.values() for value in m.values())
    assert "median [min-max] over 2 subjects" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty")]) == 2
    assert "Fix:" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_lesion_step_at_factor_zero_smooths_the_tumour_and_one_keeps_it():
    from tools.texture_ratio import with_lesion_texture

    image, truth = _brain_with_tumour(tumour_noise=1.5)
    rough = texture_ratios(image, truth)[0]["res"]
    kept = texture_ratios(with_lesion_texture(image, truth, 1.0), truth)[0]["res"]
    smooth = texture_ratios(with_lesion_texture(image, truth, 0.0), truth)[0]["res"]
    assert abs(kept - rough) < 0.25 * rough and smooth < 0.5 * rough
