"""TorchScript export: MONAI's `ckpt_export`, then a reload check against the eager network.

`export_torchscript` scripts `network_def` of inference.yaml with the weights of
models/model.pt (a bare MultiModalCAM state dict) and writes models/model.ts with the
metadata and the config embedded (MONAI's `save_net_with_metadata`).
`max_export_difference` reloads it with `torch.jit.load` and compares it with the eager
network on random slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import INFER_CONFIG, META_FILE, NET_ID, ROOT
from .verify import _paths, bundle_on_path

TOLERANCE = 1e-5


def export_torchscript(root: str | Path = ROOT, ckpt_file: str | Path | None = None, filepath: str | Path | None = None,
                       config_file: str | Sequence[str] = INFER_CONFIG, meta_file: str = META_FILE, **override) -> Path:
    """models/model.pt -> models/model.ts (paths relative to `root` unless given)."""
    from monai.bundle import ckpt_export

    root = Path(root)
    ckpt_file = Path(ckpt_file) if ckpt_file else root / "models" / "model.pt"
    filepath = Path(filepath) if filepath else root / "models" / "model.ts"
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_file}: train first (models/model.pt is the best "
                                f"validation checkpoint) or pass --ckpt")
    filepath.parent.mkdir(parents=True, exist_ok=True)
    with bundle_on_path(root):
        ckpt_export(net_id=NET_ID, filepath=str(filepath), ckpt_file=str(ckpt_file), meta_file=str(root / meta_file),
                    config_file=_paths(root, config_file), key_in_ckpt="", **override)
    return filepath


def eager_network(root: str | Path = ROOT, ckpt_file: str | Path | None = None,
                  config_file: str | Sequence[str] = INFER_CONFIG, **override) -> torch.nn.Module:
    """`network_def` of the config with the checkpoint's weights, on the CPU, in eval mode."""
    from monai.bundle import ConfigParser

    root = Path(root)
    parser = ConfigParser()
    parser.read_config(_paths(root, config_file))
    for key, value in override.items():
        parser[key] = value
    with bundle_on_path(root):
        net = parser.get_parsed_content(NET_ID)
    state = torch.load(ckpt_file or root / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def max_export_difference(ts_file: str | Path, eager: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Largest |TorchScript - eager| over `inputs` (B, C, H, W)."""
    scripted = torch.jit.load(str(ts_file), map_location="cpu").eval()
    with torch.no_grad():
        expected = eager(inputs)
        actual = scripted(inputs)
    if actual.shape != expected.shape:
        raise ValueError(f"TorchScript output shape {tuple(actual.shape)} != eager {tuple(expected.shape)}")
    return float((actual - expected).abs().max())


def check_export(root: str | Path = ROOT, ckpt_file: str | Path | None = None, ts_file: str | Path | None = None,
                 config_file: str | Sequence[str] = INFER_CONFIG, size: int = 64, batch: int = 4, seed: int = 0,
                 **override) -> float:
    """Reload model.ts and compare it with the eager network; raise when they differ by more than 1e-5."""
    root = Path(root)
    eager = eager_network(root, ckpt_file, config_file, **override)
    channels = len(eager.nets)
    inputs = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    difference = max_export_difference(ts_file or root / "models" / "model.ts", eager, inputs)
    if difference > TOLERANCE:
        raise ValueError(f"TorchScript export differs from the eager network by {difference:.3g} (> {TOLERANCE})")
    return difference
