"""CAM networks: one 2D network per MRI modality, trained from slice-level labels.

Both backbones end in the same "CAM head": a 3x3 conv + BN + ReLU giving the feature maps
(`features`), then a bias-free 1x1 conv (`classifier`) whose output maps ARE the class
activation maps at input resolution. Logits are the pooled maps (single-step CAM: global
average pool, or top-k with `MultiModalCAM`'s `pooling`), so `forward(x) == classifier(features(x))` and the tumour map is
channel `TUMOUR_CHANNEL` of the output.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from monai.networks.nets.resnet import ResNet

from scripts.common import TUMOUR_CHANNEL
# The one normaliser / slice probability / gate (re-exported here for the network's users).
from scripts.model.cams import DEFAULT_GATE_SOURCE, GATE_SOURCES, gate_maps, max_normalise, parse_pooling, tumour_probability
from scripts.runtime import BundleError

BACKBONES = ("unet", "deeplab")

# (conv, BatchNorm, ReLU): MONAI's Convolution applies its ADN block in "NDA" order, which
# with no dropout is exactly conv -> BN -> ReLU.
_ACT = "RELU"
_NORM = "BATCH"


def _conv_bn_relu(in_channels: int, out_channels: int) -> Convolution:
    """A 3x3 conv followed by BatchNorm and ReLU (the CAM head's feature layer)."""
    return Convolution(2, in_channels, out_channels, kernel_size=3, act=_ACT, norm=_NORM, padding=1)


def _bias_free_classifier(in_channels: int, num_classes: int) -> torch.nn.Conv2d:
    # Bias-free so that a map is a pure linear read-out of the features (CAM definition).
    return torch.nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad H and W up to a multiple, split evenly on both sides (flip-symmetric)."""
    height, width = x.shape[-2], x.shape[-1]
    extra_h = (multiple - height % multiple) % multiple
    extra_w = (multiple - width % multiple) % multiple
    pads = [extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2]
    if extra_h == 0 and extra_w == 0:
        return x, pads
    return F.pad(x, pads), pads


def _crop_padding(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Undo `_pad_to_multiple`."""
    height, width = x.shape[-2], x.shape[-1]
    return x[..., pads[2] : height - pads[3], pads[0] : width - pads[1]]


class UNetCAM(torch.nn.Module):
    """The authors' U-Net backbone (3 max-pools, nearest upsampling) with a CAM head.

    Widths at base b: encoder 1->b, b->2b, 2b->4b, 4b->4b; decoder (4b+4b)->2b,
    (2b+2b)->b, (b+b)->b; head b->b then 1x1 b->num_classes. About 3.4 M parameters at
    b = 64. Encoder/decoder stages are MONAI's BasicUNet blocks (TwoConv, Down, UpCat).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64) -> None:
        super().__init__()
        b = base_channels
        stage = {"act": _ACT, "norm": _NORM, "bias": True, "dropout": None}  # None: no no-op Dropout layer
        # Parameter-free nearest x2 upsampling, no halving conv: the skip is concatenated
        # to the upsampled tensor at full width, as in the authors' network.
        # is_pad=False: `_pad_to_multiple` makes every skip match its upsampled tensor, so
        # MONAI's default replicate pad would always be zero-width: a copy and its backward
        # (no measurable time on a CPU) that stops torch.compile (inductor fails on
        # replication_pad2d_backward). Same outputs, same state_dict.
        up = {"upsample": "nontrainable", "pre_conv": None, "interp_mode": "nearest",
              "align_corners": None, "halves": False, "is_pad": False}
        self.encoder0 = TwoConv(2, in_channels, b, **stage)
        self.down1 = Down(2, b, 2 * b, **stage)
        self.down2 = Down(2, 2 * b, 4 * b, **stage)
        self.down3 = Down(2, 4 * b, 4 * b, **stage)
        self.up3 = UpCat(2, 4 * b, 4 * b, 2 * b, **stage, **up)
        self.up2 = UpCat(2, 2 * b, 2 * b, b, **stage, **up)
        self.up1 = UpCat(2, b, b, b, **stage, **up)
        self.head = _conv_bn_relu(b, b)
        self.classifier = _bias_free_classifier(b, num_classes)
        self.pad_multiple = 8  # three 2x max-pools

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Head features (B, base, H, W) at input resolution; ReLU'd, so non-negative."""
        x, pads = _pad_to_multiple(x, self.pad_multiple)
        e0 = self.encoder0(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        e3 = self.down3(e2)
        d = self.up3(e3, e2)
        d = self.up2(d, e1)
        d = self.up1(d, e0)
        return _crop_padding(self.head(d), pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B, num_classes, H, W)."""
        return self.classifier(self.features(x))


def _dilate_layer(layer: torch.nn.Sequential, dilation: int, first_dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 dilated one, in place.

    MONAI's ResNet / ResNetBottleneck have no dilation option, so the built stage is edited:
    its strided convs (the first block's 3x3 and shortcut 1x1) get stride 1, and every 3x3
    conv gets the stage's dilation (the first block keeps the previous stage's dilation,
    as in DeepLab) with matching padding so sizes are preserved.
    """
    for index, block in enumerate(layer):
        rate = first_dilation if index == 0 else dilation
        block.conv2.stride = (1, 1)
        block.conv2.dilation = (rate, rate)
        block.conv2.padding = (rate, rate)
        block.stride = 1
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class DeepLabCAM(torch.nn.Module):
    """DeepLabv3-style CAM network: dilated ResNet-50 encoder + ASPP + CAM head.

    Encoder widths scale with `base_channels` (64 = standard ResNet-50, 2048 output
    channels). `output_stride` 16 dilates the last stage, 8 the last two. The head runs at
    encoder resolution and its features are upsampled bilinearly to the input size, so the
    maps are at input resolution and `forward == classifier(features)` holds exactly.
    No ImageNet weights: inputs are single-channel MRI and nothing is downloaded.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 64,
        output_stride: int = 16,
        layers: Sequence[int] = (3, 4, 6, 3),
        aspp_channels: int | None = None,
        head_channels: int | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        b = base_channels
        aspp_channels = aspp_channels or 4 * b
        head_channels = head_channels or b
        self.encoder = ResNet(
            block="bottleneck", layers=list(layers), block_inplanes=[b, 2 * b, 4 * b, 8 * b],
            spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2,
            feed_forward=False,
        )
        if output_stride == 16:
            _dilate_layer(self.encoder.layer4, dilation=2, first_dilation=1)
            rates = (1, 6, 12, 18)
        else:
            _dilate_layer(self.encoder.layer3, dilation=2, first_dilation=1)
            _dilate_layer(self.encoder.layer4, dilation=4, first_dilation=2)
            rates = (1, 12, 24, 36)
        # MONAI's SimpleASPP: four parallel (dilated) convs + 1x1 fusion with BN/ReLU. It has
        # no image-pooling branch; that branch adds little for a per-pixel CAM read-out.
        self.aspp = SimpleASPP(2, 8 * b * 4, aspp_channels, kernel_sizes=(1, 3, 3, 3),
                               dilations=rates, norm_type=_NORM, acti_type=_ACT)
        self.head = _conv_bn_relu(4 * aspp_channels, head_channels)
        self.classifier = _bias_free_classifier(head_channels, num_classes)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # The ResNet's own forward ends in global pooling; only its stem and stages are used.
        net = self.encoder
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Head features (B, head_channels, H, W), upsampled bilinearly to the input size."""
        low_res = self.head(self.aspp(self._encode(x)))
        size = [x.shape[-2], x.shape[-1]]
        return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B, num_classes, H, W)."""
        return self.classifier(self.features(x))


def build_network(
    backbone: str = "unet", *, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64,
    **kwargs,
) -> torch.nn.Module:
    """Build one modality's CAM network by backbone name (extra kwargs go to DeepLabCAM).

    Options are keyword-only so `build_network("unet", 64)` cannot silently mean 64 inputs.
    """
    if backbone == "unet":
        if kwargs:
            raise ValueError(f"UNetCAM takes no extra options, got {sorted(kwargs)}")
        return UNetCAM(in_channels, num_classes, base_channels)
    if backbone == "deeplab":
        return DeepLabCAM(in_channels, num_classes, base_channels, **kwargs)
    raise ValueError(f"unknown backbone {backbone!r}: expected one of {list(BACKBONES)}")


class MultiModalCAM(torch.nn.Module):
    """One CAM network per modality; forward gives the tumour CAM of every modality.

    `forward(x (B, K, H, W)) -> (B, K, H, W)`: channel k is modality k's max-normalised
    tumour map, zeroed on slices that network classifies as healthy (softmax tumour
    probability not above `gate_threshold`) when `gate` is on; with `gate_source: mean` the
    slice's mean probability over the K networks opens every gate instead.

    The model carries its configuration: `settings` (a `ModelSettings`)
    holds the network's shape and the geometry of the data it was trained on, and travels in
    the state dict as PyTorch's extra state (key `_extra_state`: UTF-8 JSON in a uint8 tensor,
    so tools that treat every entry as a tensor, e.g. `monai.bundle.load`, still work), and
    `models/model.pt` stays a plain state dict. Loading a state dict recorded with other
    settings raises a one-line `SettingsMismatch` naming both values; settings this network
    was built without (None) are taken from the state dict.

    Args:
        modalities: modality names, one network each, in channel order.
        backbone: "unet" (the authors' U-Net) or "deeplab" (DeepLabv3, Table IV).
        base_channels: width of the first stage (the paper: 64).
        gate: zero the maps of slices a network classifies as healthy.
        gate_threshold: tumour probability a slice must exceed to keep its map.
        gate_source: whose probability opens a network's gate: "own" or "mean" (of the K networks').
        spacing: voxel spacing (mm) the training volumes were resampled to (recorded only).
        spatial_size: in-plane (H, W) the training slices were padded / cropped to (recorded only).
        normalization: intensity normalisation of the training volumes, "volume" or "none".
        slice_normalization: per-slice normalisation of the training slices, "none" or "zscore".
        pooling: how each network's maps become slice logits (`scripts.model.cams.pooling_spec`):
            "gap" (the paper) or "topk:<fraction>"; None = the value a loaded state dict records,
            else "gap". The gate at inference uses the same pooling as training did.
        network_kwargs: further options of the backbone (DeepLabCAM).
    """

    __jit_ignored_attributes__ = ["settings"]  # a Python object: not part of the scripted module

    def __init__(
        self,
        modalities: Sequence[str],
        backbone: str = "unet",
        base_channels: int = 64,
        gate: bool = True,
        gate_threshold: float = 0.5,
        gate_source: str = DEFAULT_GATE_SOURCE,
        spacing: float | Sequence[float] | None = None,
        spatial_size: Sequence[int] | None = None,
        normalization: str | None = None,
        slice_normalization: str | None = None,
        pooling: str | None = None,
        **network_kwargs,
    ) -> None:
        super().__init__()
        if len(modalities) == 0:
            raise ValueError("MultiModalCAM needs at least one modality")
        self.modalities = list(modalities)
        self.nets = torch.nn.ModuleList(
            [build_network(backbone, in_channels=1, num_classes=2, base_channels=base_channels,
                           **network_kwargs) for _ in self.modalities]
        )
        self.gate = gate
        self.tumour_channel = TUMOUR_CHANNEL  # an attribute: TorchScript cannot read globals
        self.gate_threshold = float(gate_threshold)
        if gate_source not in GATE_SOURCES:
            raise ValueError(f"gate_source must be one of {GATE_SOURCES}, got {gate_source!r}")
        self.gate_source = gate_source
        self.settings = ModelSettings(modalities=self.modalities, backbone=backbone, base_channels=base_channels,
                                      spacing=spacing, spatial_size=spatial_size, normalization=normalization,
                                      slice_normalization=slice_normalization, pooling=pooling)
        self._apply_pooling()
        # A state dict written before settings were recorded has no `_extra_state`: accept it.
        self._register_load_state_dict_pre_hook(_allow_missing_extra_state)

    def get_extra_state(self) -> torch.Tensor:
        return self.settings.to_tensor()

    def set_extra_state(self, state) -> None:
        recorded = ModelSettings.from_state(state)
        self.settings = self.settings.merged(recorded, source="the state dict being loaded")
        self._apply_pooling()

    def _apply_pooling(self) -> None:
        """Give this model and each modality network the pooling of `settings` (plain attributes,
        so TorchScript keeps them and `scripts.model.cams.pooling_of` reads them from a bare net)."""
        self.pool_kind, self.pool_fraction = parse_pooling(self.settings.pooling)
        for net in self.nets:
            net.cam_pooling, net.cam_topk_fraction = self.pool_kind, self.pool_fraction

    def gated_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) slices -> (B, K, H, W) tumour maps, gated as configured (class docstring)."""
        if x.shape[1] != len(self.nets):
            raise ValueError(f"expected {len(self.nets)} modality channels, got {x.shape[1]}")
        cams: list[torch.Tensor] = []
        probabilities: list[torch.Tensor] = []
        for index, net in enumerate(self.nets):  # TorchScript: a loop over the ModuleList
            raw = net(x[:, index : index + 1]).float()  # the normaliser and softmax in float32, also under autocast
            cams.append(max_normalise(raw)[:, self.tumour_channel])
            probabilities.append(tumour_probability(raw, self.tumour_channel, self.pool_kind, self.pool_fraction))
        maps = torch.stack(cams, dim=1)
        if not self.gate:
            return maps
        # scripts.model.cams.gate_probabilities and gate_maps, written out for TorchScript (B, K) at once
        probs = torch.stack(probabilities, dim=1)
        if self.gate_source == "mean":
            probs = probs.mean(dim=1, keepdim=True).expand_as(probs)
        keep = (probs > self.gate_threshold).to(maps.dtype)
        return maps * keep[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated_maps(x)


def _allow_missing_extra_state(state_dict, prefix, *args) -> None:
    state_dict.setdefault(prefix + "_extra_state", None)


# ---------------------------------------------------------------------------------------
# The configuration a model carries


class SettingsMismatch(BundleError):
    """A setting given for a model differs from the one the model was trained with."""


def _canonical(name: str, value):
    """One spelling per setting, so 3 and [3.0, 3.0, 3.0] compare equal."""
    if value is None:
        return None
    if name == "modalities":
        from scripts.common import canonical_modalities

        return list(canonical_modalities(list(value)))
    if name == "spacing":
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        return values * 3 if len(values) == 1 else values
    if name == "spatial_size":
        return [int(v) for v in value]
    if name == "base_channels":
        return int(value)
    if name == "pooling":
        from scripts.model.cams import pooling_spec

        return pooling_spec(*parse_pooling(value))
    return str(value)


@dataclasses.dataclass
class ModelSettings:
    """What a model needs to be rebuilt and fed: network shape and training geometry.

    None = not known (e.g. a network built without data settings, or an older checkpoint).

    Args:
        modalities: modality names, one network each, in channel order.
        backbone: "unet" or "deeplab".
        base_channels: width of the first stage.
        spacing: voxel spacing (mm, 3 values) the training volumes were resampled to.
        spatial_size: in-plane (H, W) the training slices were padded / cropped to.
        normalization: "volume" (z-score over brain voxels) or "none".
        slice_normalization: "none" or "zscore" (the paper's per-slice z-score).
        pooling: slice logits from the maps, "gap" or "topk:<fraction>" (None in a checkpoint
            written before it was recorded: GAP, the only pooling then).
    """

    modalities: list | None = None
    backbone: str | None = None
    base_channels: int | None = None
    spacing: list | None = None
    spatial_size: list | None = None
    normalization: str | None = None
    slice_normalization: str | None = None
    pooling: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, _canonical(field.name, getattr(self, field.name)))

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_tensor(self) -> torch.Tensor:
        """UTF-8 JSON as a uint8 tensor: a state-dict entry every tensor tool can carry."""
        return torch.tensor(list(json.dumps(self.as_dict(), sort_keys=True).encode()), dtype=torch.uint8)

    @classmethod
    def from_state(cls, state) -> "ModelSettings":
        """Settings from a state dict's `_extra_state` (tensor, dict or None = not recorded)."""
        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1 and state.numel():
            state = json.loads(bytes(state.tolist()).decode())
        if not isinstance(state, dict):
            return cls()
        # Settings recorded before the pooling was: those models were trained with GAP.
        return cls.from_dict({"pooling": "gap", **state} if state else state)

    def merged(self, other: "ModelSettings", source: str, flag: str = "") -> "ModelSettings":
        """These settings completed by `other`'s; a value both know and that differs is an error."""
        merged = {}
        for name, own in self.as_dict().items():
            theirs = getattr(other, name)
            if own is not None and theirs is not None and own != theirs:
                raise SettingsMismatch(
                    f"{flag}{name} {own!r} differs from {name} {theirs!r} recorded in {source}. Fix: leave "
                    f"{flag or 'the setting '}{name} out to use the recorded value, or use a model trained with {own!r}.")
            merged[name] = own if own is not None else theirs
        return ModelSettings(**merged)


# Architecture defaults for tools that build `network_def` without any checkpoint (MONAI's
# verify_net_in_out, export of random weights); a checkpoint's own settings always win.
DEFAULT_SETTINGS = ModelSettings(modalities=["t1", "t1c", "t2", "flair"], backbone="unet", base_channels=16,
                                 spacing=3.0, spatial_size=[72, 72], normalization="volume",
                                 slice_normalization="none", pooling="topk:0.01")


class UnreadableCheckpoint(BundleError):
    """A model checkpoint that torch cannot read (truncated, corrupt, not a checkpoint)."""


def read_checkpoint(path):
    """torch.load(path) on the CPU (weights only), or an `UnreadableCheckpoint` naming the file and the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip errors, EOFError, unpickling errors, ...
        first = str(err).splitlines()[0].split(". ")[0][:200] if str(err) else ""
        raise UnreadableCheckpoint(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {first}); it is truncated or corrupt (a full "
            f"disk, or a copy cut short). Fix: copy or export it again (training keeps the best model in "
            f"<ckpt_dir>/model.pt), or pass --ckpt_path to another checkpoint.") from err


class WrongCheckpoint(BundleError):
    """A checkpoint of another kind (training state, stage-2 model) where the CAM model is needed."""


def check_model_kind(state, path) -> None:
    """Raise WrongCheckpoint when `state` is training's last.pt or a stage-2 model, not a CAM
    model: without it either ended in "the checkpoint does not fit the network" (other settings?).

    Args:
        state: the loaded checkpoint.
        path: its file, for the message.
    """
    if not isinstance(state, dict):
        return
    if "run_settings" in state and "network" in state:
        raise WrongCheckpoint(f"{path} is training's last.pt (the network with its optimisers and random states, to "
                              f"resume training), not a model. Fix: pass the model training keeps beside it, "
                              f"{Path(path).with_name('model.pt')} (the best validation epoch), as --ckpt_path.")
    extra = state.get("_extra_state")
    if isinstance(extra, torch.Tensor) and extra.dtype == torch.uint8 and extra.dim() == 1 and extra.numel():
        try:
            kind = json.loads(bytes(extra.tolist()).decode()).get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind is not None:  # CAM models record no kind; a stage-2 model records "stage2_segmentation"
            raise WrongCheckpoint(f"{path} is a {kind} model (stage 2), not the CAM model this inference runs. Fix: "
                                  f"pass the CAM model (e.g. models/model.pt) as --ckpt_path; to serve the stage-2 "
                                  f"model add configs/stage2_inference.yaml to --config_file and pass it as "
                                  f"--stage2_ckpt_path.")


def checkpoint_settings(path) -> ModelSettings:
    """The settings recorded in a model checkpoint (all None when absent or not recorded); an
    existing file that cannot be read is an `UnreadableCheckpoint`."""
    if path is None or not Path(path).is_file():
        return ModelSettings()
    state = read_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    check_model_kind(state, path)
    settings = ModelSettings.from_state(state.get("_extra_state") if isinstance(state, dict) else None)
    if settings.modalities is not None and settings.pooling is None:
        # recorded settings (modalities are always recorded) without a pooling: the network was built
        # without one and ran with GAP (cams.parse_pooling), whatever DEFAULT_SETTINGS says today
        settings = ModelSettings.from_dict({**settings.as_dict(), "pooling": "gap"})
    return settings


def model_settings(ckpt_path=None, **given) -> dict:
    """The model's settings for a workflow: values given explicitly (not None), else those the
    checkpoint records, else `DEFAULT_SETTINGS`. A given value that differs from the recorded
    one raises a one-line `SettingsMismatch` naming both (e.g. `--base_channels 8` for a model
    trained with 16).
    """
    explicit = ModelSettings.from_dict(given)
    recorded = checkpoint_settings(ckpt_path)
    settings = explicit.merged(recorded, source=f"the checkpoint {ckpt_path}", flag="--")
    defaults = DEFAULT_SETTINGS.as_dict()
    return {name: value if value is not None else defaults[name] for name, value in settings.as_dict().items()}
