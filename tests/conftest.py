"""Fixtures and collection rules shared by the test files."""

from __future__ import annotations

import re

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


# --------------------------------------------------------------------------- consumer tests

_SELECTING = re.compile(r"(?<!not )\b(consumers|slow)\b")


def consumers_selected(markexpr: str | None) -> bool:
    """True when a -m expression asks for the consumer tests by name (`consumers`, `slow`,
    `slow and consumers`, ...), not only by a negation (`not slow`)."""
    return bool(_SELECTING.search(" ".join((markexpr or "").split())))


def pytest_collection_modifyitems(config, items):
    """Tests marked `consumers` build multi-GB virtual environments (tests/consumer_envs.py): they
    run only when the -m expression names them (`-m consumers` or `-m slow`); a plain
    `pytest tests/test_consumers.py` (pytest.ini selects no marker by default) skips them."""
    if consumers_selected(config.getoption("markexpr", "")):
        return
    skip = pytest.mark.skip(reason="builds consumer virtual environments: select with -m consumers (or -m slow)")
    for item in items:
        if item.get_closest_marker("consumers") is not None:
            item.add_marker(skip)
