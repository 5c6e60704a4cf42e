"""Issue #33, case 6: a stage-2 mask over most of the brain (and the background) was written silently.

The CAM mask had a > 30 % check; the stage-2 mask now gets the same warning (scripts.data.sanity.
mask_warning, with the voxels outside the brain counted), from the stage-2 evaluator itself.
"""

from __future__ import annotations

import logging

import pytest
import torch

from scripts.data.sanity import mask_warning
from scripts.runtime import BundleError
from scripts.stage2.inference import Stage2Evaluator


class EverywhereTumour(torch.nn.Module):
    """A stand-in stage-2 network whose every pixel is tumour (the failure the issue measured)."""

    modalities = ["t1", "flair"]

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), 5.0 * self.scale * torch.ones_like(x[:, 0])], dim=1)


def test_a_stage2_mask_over_the_brain_and_background_is_a_warning(caplog):
    image = torch.zeros(2, 20, 20, 4)
    image[:, 5:15, 5:15, :] = 1.0  # 400 brain voxels, 1200 background voxels
    evaluator = Stage2Evaluator("cpu", [], EverywhereTumour(), threshold=0.5)
    with caplog.at_level(logging.WARNING, logger="scripts.data.sanity"):
        output = evaluator.predict(image, "Case01")
    assert bool(output["stage2_mask"].all())
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("subject Case01: the stage-2 mask covers 100.0 % of the brain (whole tumours cover less "
                              "than 30 %) and 1200 voxels outside it (tumours lie inside the brain)"), warning
    assert "Do not trust this mask." in warning


def test_a_mask_mostly_outside_the_brain_is_flagged_even_when_small_inside():
    brain = torch.zeros(10, 10, 4, dtype=torch.bool)
    brain[:5] = True
    mask = torch.zeros_like(brain)
    mask[0, :2] = True  # 8 voxels inside (4 %)
    assert mask_warning(mask, brain, "S", log=False) == []
    mask[6:] = True  # 160 voxels outside
    (message,) = mask_warning(mask, brain, "S", log=False, what="stage-2 mask")
    assert message.startswith("subject S: the stage-2 mask covers 4.0 % of the brain (whole tumours cover less than "
                              "30 %) and 160 voxels outside it")


def test_a_stage2_threshold_outside_the_unit_interval_is_refused():
    with pytest.raises(BundleError, match=r"--stage2_threshold must be a number in \[0, 1\), got 1.5"):
        Stage2Evaluator("cpu", [], EverywhereTumour(), threshold=1.5)
