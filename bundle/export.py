"""TorchScript export: a self-contained models/model.ts that bundle consumers run unchanged.

`export_torchscript` builds `network_def` of inference.yaml (scripts.model.whole_tumour.WholeTumourCAM:
per-modality CAMs, gating and fusion (inference.yaml `fusion`) in one module) with the weights of models/model.pt (a
bare state dict), scripts it with MONAI's `convert_to_torchscript` and writes it with MONAI's
`save_net_with_metadata`, the two steps of `monai.bundle ckpt_export`. Embedded as extra files:
metadata.json (configs/metadata.json, inputs named after the model's modalities) and
inference.json: configs/inference_deploy.yaml, MONAI components only, with the model's spacing,
slice size and modalities written in (`consumer_config`). `ckpt_export` itself would embed the
config that defines the network (inference.yaml, which imports `scripts`), which a TorchScript
file cannot carry, hence these few lines around MONAI's own functions.
`max_export_difference` reloads the file with `torch.jit.load` and compares it with the eager
network on random slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import DEPLOY_CONFIG, INFER_CONFIG, META_FILE, NET_ID, ROOT
from .verify import _paths, bundle_on_path

TOLERANCE = 1e-5
CHANNEL_NAMES = {"t1": "T1", "t1c": "T1c (post-contrast T1; BraTS t1ce)", "t2": "T2", "flair": "FLAIR"}


def _parser(root: Path, config_file, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_paths(root, config_file))
    for key, value in override.items():
        parser[key] = value
    return parser


def _weights(root: Path, ckpt_file) -> Path:
    path = Path(ckpt_file) if ckpt_file else Path(root) / "models" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (models/model.pt is the best validation "
                                f"checkpoint) or pass --ckpt")
    return path


def model_settings(root: str | Path = ROOT, ckpt_file: str | Path | None = None,
                   config_file: str | Sequence[str] = INFER_CONFIG, **override) -> dict:
    """The settings inference.yaml resolves for this checkpoint (recorded ones, else defaults)."""
    root = Path(root)
    parser = _parser(root, config_file, ckpt_path=str(_weights(root, ckpt_file)), **override)
    with bundle_on_path(root):
        return dict(parser.get_parsed_content("model_settings"))


def consumer_config(settings: dict, root: str | Path = ROOT, deploy_config: str = DEPLOY_CONFIG) -> dict:
    """configs/inference_deploy.yaml with the model's modalities, spacing and slice size written in."""
    from monai.bundle import ConfigParser

    if (settings.get("normalization") or "volume") != "volume" or (settings.get("slice_normalization") or "none") != "none":
        raise ValueError(f"the consumer config ({deploy_config}) has the default normalisation (z-score per volume, "
                         f"none per slice); this model was trained with normalization={settings.get('normalization')!r}, "
                         f"slice_normalization={settings.get('slice_normalization')!r}. Fix: export a model trained "
                         f"with the defaults, or run it with configs/inference.yaml")
    config = ConfigParser.load_config_file(str(Path(root) / deploy_config))
    spacing = settings["spacing"]
    config["modalities"] = list(settings["modalities"])
    config["spacing"] = [float(v) for v in (spacing if isinstance(spacing, (list, tuple)) else [spacing] * 3)]
    config["spatial_size"] = [int(v) for v in settings["spatial_size"]]
    return config


def consumer_metadata(settings: dict, root: str | Path = ROOT, meta_file: str = META_FILE) -> dict:
    """configs/metadata.json with the input channels of the model's modalities."""
    meta = json.loads((Path(root) / meta_file).read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    image["num_channels"] = len(settings["modalities"])
    image["channel_def"] = {str(i): CHANNEL_NAMES[m] for i, m in enumerate(settings["modalities"])}
    return meta


def export_torchscript(root: str | Path = ROOT, ckpt_file: str | Path | None = None, filepath: str | Path | None = None,
                       config_file: str | Sequence[str] = INFER_CONFIG, meta_file: str = META_FILE,
                       deploy_config: str = DEPLOY_CONFIG, **override) -> Path:
    """models/model.pt -> models/model.ts with metadata.json and inference.json embedded
    (paths relative to `root` unless given); `override`: config values, e.g. gate=False."""
    from monai.data import save_net_with_metadata
    from monai.networks.utils import convert_to_torchscript

    root = Path(root)
    ckpt_file = _weights(root, ckpt_file)
    filepath = Path(filepath) if filepath else root / "models" / "model.ts"
    settings = model_settings(root, ckpt_file, config_file, **override)
    extra = {"inference.json": json.dumps(consumer_config(settings, root, deploy_config)).encode()}
    net = eager_network(root, ckpt_file, config_file, **override)
    scripted = convert_to_torchscript(model=net)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    save_net_with_metadata(scripted, str(filepath), meta_values=consumer_metadata(settings, root, meta_file),
                           more_extra_files=extra)
    return filepath


def eager_network(root: str | Path = ROOT, ckpt_file: str | Path | None = None,
                  config_file: str | Sequence[str] = INFER_CONFIG, **override) -> torch.nn.Module:
    """`network_def` of the config with the checkpoint's weights, on the CPU, in eval mode."""
    root = Path(root)
    ckpt_file = _weights(root, ckpt_file)
    parser = _parser(root, config_file, **{"ckpt_path": str(ckpt_file), **override})  # the settings it records
    with bundle_on_path(root):
        net = parser.get_parsed_content(NET_ID)
    state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
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
