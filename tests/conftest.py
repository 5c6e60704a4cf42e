"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch

from scripts.model.networks import MultiModalCAM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A seeded, untrained 4-modality MultiModalCAM (base 4) saved as a state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(MultiModalCAM(["t1", "t1c", "t2", "flair"], base_channels=4).state_dict(), path)
    return str(path)
