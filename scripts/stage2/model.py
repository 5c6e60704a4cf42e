"""Stage 2: the segmentation network trained on the CMER pseudo-masks, and its loss.

The network is MONAI's own (`monai.networks.nets.UNet` or `SegResNet`, 2D, all modalities as
input channels, two output classes). `Stage2Net` only wraps it so that the model carries its
settings (modalities, geometry of the training volumes) in its state dict, as the CAM model
does (`scripts.model.networks.MultiModalCAM`): inference reads them back, so the stage-2 mask is
made with the preprocessing it was trained with.

`IgnoreDiceCELoss` is MONAI's DiceCELoss with an ignore label: pixels the confidence filter
left undecided (`scripts.stage2.pseudo_labels`) count in neither the Dice nor the cross-entropy term.
MONAI 1.6.1's DiceCELoss does not expose `ignore_index`, although both of its parts
(`DiceLoss`, `torch.nn.CrossEntropyLoss`) support it; the subclass only passes it on.
"""

from __future__ import annotations

import dataclasses
import math
import json
from pathlib import Path
from typing import Sequence

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet, UNet

from scripts.runtime import BundleError

NETWORKS = ("unet", "segresnet")
KIND = "stage2_segmentation"  # recorded, so a CAM checkpoint is never taken for a stage-2 one
DIVISOR = 8  # three 2x downsamplings in both networks


@dataclasses.dataclass
class Stage2Settings:
    """What a stage-2 model needs to be rebuilt and fed (recorded in its state dict).

    The names shared with `scripts.model.networks.ModelSettings` (modalities, base_channels, spacing,
    spatial_size, normalization) mean the same, so `scripts.model.networks.model_settings` reads the
    geometry of a stage-2 checkpoint too.

    Args:
        modalities: input channels, in order.
        network: "unet" or "segresnet".
        base_channels: width of the first stage.
        spacing: voxel spacing (mm, 3 values) the training volumes were resampled to.
        spatial_size: in-plane (H, W) of the training slices.
        normalization: intensity normalisation of the training volumes.
    """

    modalities: list | None = None
    network: str | None = None
    base_channels: int | None = None
    spacing: list | None = None
    spatial_size: list | None = None
    normalization: str | None = None

    def as_dict(self) -> dict:
        return {"kind": KIND, **dataclasses.asdict(self)}

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.as_dict(), sort_keys=True).encode()), dtype=torch.uint8)

    @classmethod
    def from_state(cls, state) -> "Stage2Settings | None":
        """Settings from a state dict's `_extra_state`; None when it is not a stage-2 record."""
        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1 and state.numel():
            state = json.loads(bytes(state.tolist()).decode())
        if not isinstance(state, dict) or state.get("kind") != KIND:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def _spacing(value) -> list | None:
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * 3 if len(values) == 1 else values


class Stage2Net(torch.nn.Module):
    """A MONAI 2D segmentation network over all modalities: (B, K, H, W) -> logits (B, 2, H, W).

    Args:
        modalities: input channels (the CAM model's modalities), in order.
        network: "unet" (monai.networks.nets.UNet, residual units) or "segresnet" (SegResNet).
        base_channels: width of the first stage (UNet: b, 2b, 4b, 8b; SegResNet: init_filters).
        num_res_units: residual units per UNet stage.
        dropout: dropout probability of the network.
        spacing: voxel spacing (mm) of the training volumes (recorded only).
        spatial_size: in-plane (H, W) of the training slices; each side a multiple of 8.
        normalization: intensity normalisation of the training volumes (recorded only).
    """

    __jit_ignored_attributes__ = ["settings"]

    def __init__(self, modalities: Sequence[str], network: str = "unet", base_channels: int = 16,
                 num_res_units: int = 2, dropout: float = 0.0, spacing=None, spatial_size: Sequence[int] | None = None,
                 normalization: str | None = None):
        super().__init__()
        if network not in NETWORKS:
            raise BundleError(f"--stage2_network must be one of {list(NETWORKS)}, got {network!r}.")
        if spatial_size is not None and any(int(s) % DIVISOR for s in spatial_size):
            raise BundleError(f"stage 2 needs slice sides that are multiples of {DIVISOR}, got spatial_size "
                              f"{list(spatial_size)}. Fix: train stage 1 with such a spatial_size (e.g. 72 x 72, the default).")
        b, k = int(base_channels), len(modalities)
        if network == "unet":
            self.net = UNet(spatial_dims=2, in_channels=k, out_channels=2, channels=(b, 2 * b, 4 * b, 8 * b),
                            strides=(2, 2, 2), num_res_units=int(num_res_units), norm="BATCH", dropout=float(dropout))
        else:
            self.net = SegResNet(spatial_dims=2, init_filters=b, in_channels=k, out_channels=2,
                                 dropout_prob=float(dropout) or None,
                                 norm=("GROUP", {"num_groups": math.gcd(8, b)}))  # 8 groups when b allows
        self.modalities = list(modalities)
        self.settings = Stage2Settings(modalities=list(modalities), network=network, base_channels=b,
                                       spacing=_spacing(spacing),
                                       spatial_size=None if spatial_size is None else [int(s) for s in spatial_size],
                                       normalization=normalization)
        self._register_load_state_dict_pre_hook(_check_kind)

    def get_extra_state(self) -> torch.Tensor:
        return self.settings.to_tensor()

    def set_extra_state(self, state) -> None:
        recorded = Stage2Settings.from_state(state)
        if recorded is not None:
            self.settings = recorded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check_kind(state_dict, prefix, *args) -> None:
    """A CAM checkpoint given as the stage-2 one: one line instead of a key mismatch per tensor."""
    if Stage2Settings.from_state(state_dict.get(prefix + "_extra_state")) is None:
        raise BundleError("the checkpoint is not a stage-2 model (no stage-2 settings recorded; a CAM model.pt?). "
                          "Fix: pass the stage-2 checkpoint (stage2_model.pt, written by the stage-2 training).")


def recorded_settings(path) -> Stage2Settings:
    """The settings a stage-2 checkpoint records (all None when the file is absent)."""
    if path is None or not Path(path).is_file():
        return Stage2Settings()
    state = torch.load(path, map_location="cpu", weights_only=True)
    recorded = Stage2Settings.from_state(state.get("_extra_state") if isinstance(state, dict) else None)
    if recorded is None:
        raise BundleError(f"{path} is not a stage-2 model (no stage-2 settings recorded). Fix: pass the "
                          f"stage2_model.pt written by the stage-2 training.")
    return recorded


def recorded_setting(path, name: str, default=None):
    """One recorded setting of a stage-2 checkpoint (`default` when absent), for configs."""
    value = getattr(recorded_settings(path), name)
    return default if value is None else value


def build_from_checkpoint(path, device="cpu") -> Stage2Net:
    """A Stage2Net built from the settings its checkpoint records, weights loaded, in eval mode."""
    settings = recorded_settings(path)
    if settings.modalities is None:
        raise BundleError(f"no stage-2 checkpoint at {path}. Fix: train stage 2 first (python -m monai.bundle run "
                          f"training --config_file \"['configs/train.yaml','configs/stage2.yaml']\").")
    net = Stage2Net(settings.modalities, settings.network, settings.base_channels, spacing=settings.spacing,
                    spatial_size=settings.spatial_size, normalization=settings.normalization)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.to(device).eval()


class IgnoreDiceCELoss(DiceCELoss):
    """MONAI DiceCELoss whose Dice and CE parts skip pixels labelled `ignore_index`.

    Args:
        ignore_index: label value of pixels that count in neither term (None: none).
        kwargs: MONAI DiceCELoss options (to_onehot_y, softmax, batch, lambda_dice, lambda_ce, ...).
    """

    def __init__(self, ignore_index: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if ignore_index is not None:
            self.dice.ignore_index = int(ignore_index)
            self.cross_entropy.ignore_index = int(ignore_index)
