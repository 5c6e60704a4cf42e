"""CAM networks: one 2D network per MRI modality, trained from slice-level labels.

Both backbones end in the same "CAM head": a 3x3 conv + BN + ReLU giving the feature maps
(`features`), then a bias-free 1x1 conv (`classifier`) whose output maps ARE the class
activation maps at input resolution. Logits are the global average pool of the maps
(single-step CAM), so `forward(x) == classifier(features(x))` and the tumour map is
channel `TUMOUR_CHANNEL` of the output.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from monai.networks.nets.resnet import ResNet

from scripts.common import TUMOUR_CHANNEL

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
        up = {"upsample": "nontrainable", "pre_conv": None, "interp_mode": "nearest",
              "align_corners": None, "halves": False}
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


def logits_from_maps(maps: torch.Tensor) -> torch.Tensor:
    """Slice-level logits (B, C): global average pool of the CAMs."""
    return maps.mean(dim=(-2, -1))


def max_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per sample and channel: relu, then min-max to [0, 1] (the authors' normaliser)."""
    maps = F.relu(maps)
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return F.relu(maps - low - 1e-8) / (high - low + 1e-8)


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
    probability < gate_threshold) when `gate` is on.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        backbone: str = "unet",
        base_channels: int = 64,
        gate: bool = True,
        gate_threshold: float = 0.5,
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

    def _tumour_map(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) raw maps -> (B, H, W) normalised, optionally gated tumour map."""
        maps = maps.float()  # the normaliser and softmax in float32, also under autocast
        cam = max_normalise(maps)[:, self.tumour_channel]
        if self.gate:
            probability = torch.softmax(logits_from_maps(maps), dim=1)[:, self.tumour_channel]
            keep = (probability > self.gate_threshold).to(cam.dtype)  # as argmax: ties -> healthy
            cam = cam * keep[:, None, None]
        return cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != len(self.nets):
            raise ValueError(f"expected {len(self.nets)} modality channels, got {x.shape[1]}")
        cams: list[torch.Tensor] = []
        for index, net in enumerate(self.nets):
            cams.append(self._tumour_map(net(x[:, index : index + 1])))
        return torch.stack(cams, dim=1)
