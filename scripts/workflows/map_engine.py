"""The map engine: K per-modality CAM networks over a volume -> maps, fused map and mask.

One route for every workflow: `scripts.workflows.validation.CAMValidator` (validation each epoch),
`scripts.workflows.inference.CAMMapEvaluator` (evaluation of cached test volumes and inference on new
files) and the experiments all call `MapEngine`, so validation DSC, test DSC and the masks
written by inference come from the same code with the same settings:

    slices (MONAI SliceInferer, whole axial slices, each once)
      -> per modality: optional per-slice z-score (the training's `slice_normalization`)
      -> CAM / GradCAM++ / softmax map, max-normalised, with the slice's tumour probability
         (scripts.model.cams), optional fixed-view TTA
      -> gating: zero the map of a slice whose probability is not above `gate_threshold`
         (`gate_source`: the network's own probability, or the mean over the networks)
      -> volumes (M, H, W, D), empty on slices without brain
      -> fusion over modalities (max or mean) -> mask = fused > `threshold`

The gating threshold (`gate_threshold`) and the binarisation threshold (`threshold`) are two
named settings, the same in train.yaml (validation), evaluate.yaml and inference.yaml.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
import torch.nn as nn
from monai.inferers import Inferer, SliceInferer

from scripts.common import MODALITIES
from scripts.data.slices import slice_zscore
from scripts.model.cams import (DEFAULT_FUSION, DEFAULT_GATE_SOURCE, FUSIONS, GATE_SOURCES, METHODS, TTA_CHOICES, _device_of,
                                augmented_maps, binarise, fuse_maps, gate_maps, gate_probabilities)
from scripts.precision import autocast, resolve_precision
from scripts.runtime import as_flag
from scripts.workflows.options import UNIT_INTERVAL, check_choice, check_unit_interval

SLICE_NORMALIZATIONS = ("none", "zscore")


def brain_slices(image: torch.Tensor) -> torch.Tensor:
    """(D,) bool: axial slices with any non-zero voxel in any channel of (K, H, W, D).

    The preprocessing keeps the background at exactly zero (normalisation over non-zero
    voxels, zero padding), so this is the same test the cache stores for training.
    """
    return (torch.as_tensor(image) != 0).reshape(-1, image.shape[-1]).any(dim=0)


def as_modality_nets(nets) -> dict[str, nn.Module]:
    """dict modality -> net from a dict or a MultiModalCAM-like model (`modalities`, `nets`)."""
    if isinstance(nets, Mapping):
        return dict(nets)
    if hasattr(nets, "nets") and hasattr(nets, "modalities"):
        return dict(zip(list(nets.modalities), list(nets.nets)))
    raise TypeError("expected a dict modality -> network or a model with `modalities` and `nets`")


def _channel_order(nets: Mapping[str, nn.Module], n_channels: int, channels) -> list[str]:
    """Which modality each volume channel holds: given, else the nets' order, else MODALITIES."""
    if channels is not None:
        order = list(channels)
    elif n_channels == len(nets):
        order = list(nets)
    elif n_channels == len(MODALITIES):
        order = list(MODALITIES)
    else:
        raise ValueError(f"volume has {n_channels} channels but {len(nets)} networks {list(nets)}: pass `channels`")
    if len(order) != n_channels:
        raise ValueError(f"channels {order} do not name the {n_channels} channels of the volume")
    return order


def networks_to_run(nets, channels: Sequence[str], present: Sequence[str] | None = None) -> list[str]:
    """The one rule for a missing modality, in evaluation and inference alike: the network of a
    modality runs when the volume has its channel and the subject had its file (`present`; an
    evaluation volume zero-fills a missing file under `allow_missing`, an inference volume leaves
    it out); the fusion is over those networks.

    Args:
        nets: the networks, modality -> network (or their modalities), in network order.
        channels: the modality of each channel of the volume.
        present: the modalities that had an input file; None = every channel.
    """
    return [m for m in nets if m in channels and (present is None or m in present)]


@dataclasses.dataclass
class VolumeMaps:
    """The engine's result for one volume (tensors on the CPU, float32 unless said).

    Attributes:
        names: modalities whose network ran (those with an input channel), in network order.
        maps: (M, H, W, D) gated, normalised maps of those networks.
        probabilities: (M, D) slice tumour probabilities (0 on slices without brain).
        fused: (H, W, D) fused map; the single map itself when M == 1.
        mask: (H, W, D) bool, fused > threshold.
        brain: (D,) bool, slices that hold brain.
    """

    names: list[str]
    maps: torch.Tensor
    probabilities: torch.Tensor
    fused: torch.Tensor
    mask: torch.Tensor
    brain: torch.Tensor


class MapEngine:
    """Volume maps, fused map and mask of a multi-modal CAM model (module docstring).

    Args:
        method: "cam" (the paper), "gradcampp", or "softmax" (a fully supervised network).
        gate: zero the map of a slice its network classifies as healthy.
        gate_threshold: tumour probability a slice must exceed to keep its map (0.5 = argmax).
        fusion: "max" (the paper) or "mean" over the modalities.
        threshold: binarisation threshold of the fused map (mask = fused > threshold).
        gate_source: "own" (each network's gate follows its own slice probability) or "mean"
            (every gate follows the mean probability of the networks that run).
        tta: None, "flips" or "flips_rot90" (fixed views, inverted exactly).
        slice_batch_size: slices per forward.
        precision: auto | bf16 | fp16 | fp32 autocast of the networks (scripts.precision);
            None = fp32. Maps are normalised in float32 either way.
        slice_normalization: "none" or "zscore": the per-slice normalisation the networks were
            trained with (the model records it), applied to every slice before the networks.
        inferer: the slice inferer; default MONAI's SliceInferer over whole slices.
    """

    def __init__(self, method: str = "cam", gate: bool = True, gate_threshold: float = 0.5, fusion: str = DEFAULT_FUSION,
                 threshold: float = 0.5, tta: str | None = None, slice_batch_size: int = 32,
                 precision: str | None = None, slice_normalization: str | None = "none",
                 inferer: Inferer | None = None, gate_source: str = DEFAULT_GATE_SOURCE):
        # the rules of scripts.workflows.options: the configs check the same values in `initialize`
        check_choice("method", method, METHODS)
        check_choice("tta", tta, TTA_CHOICES)
        check_choice("fusion", fusion, FUSIONS)
        check_choice("gate_source", gate_source, GATE_SOURCES)
        slice_normalization = slice_normalization or "none"
        check_choice("slice_normalization", slice_normalization, SLICE_NORMALIZATIONS)
        # as_flag: `--gate false` arrives as the string 'false', which bool() would read as True
        self.method, self.gate = method, as_flag(gate, "gate")
        self.gate_threshold = check_unit_interval("gate_threshold", gate_threshold, UNIT_INTERVAL["gate_threshold"])
        self.gate_source = gate_source
        self.fusion, self.tta = fusion, tta
        self.threshold = check_unit_interval("threshold", threshold, UNIT_INTERVAL["threshold"])
        self.slice_batch_size = int(slice_batch_size)
        self.precision = precision
        self.slice_normalization = slice_normalization
        self.inferer = inferer

    def _slice_function(self, nets: Sequence[nn.Module]):
        """(b, M, H, W) slices -> (b, 2M, H, W): M maps, then M probabilities spread over the
        slice (SliceInferer stitches spatial outputs only)."""

        def slice_maps(x: torch.Tensor) -> torch.Tensor:
            if self.slice_normalization == "zscore":
                x = torch.stack([slice_zscore(s) for s in x])
            maps, probs = [], []
            for k, net in enumerate(nets):
                m, p = augmented_maps(net, x[:, k:k + 1], self.method, self.tta, self.slice_batch_size)
                maps.append(m)
                probs.append(p)
            if self.gate:  # every network's probability is known before any gate opens (gate_source: mean)
                opens = gate_probabilities(torch.stack(probs), self.gate_source)
                maps = [gate_maps(m, o, self.gate_threshold) for m, o in zip(maps, opens)]
            spread = [p[:, None, None].expand_as(m) for m, p in zip(maps, probs)]  # each network's own
            return torch.stack(maps + spread, dim=1)

        return slice_maps

    def modality_maps(self, nets: Sequence[nn.Module], volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, H, W, D) volume, one network per channel -> maps (M, H, W, D), probabilities (M, D)."""
        device = _device_of(nets[0])
        inferer = self.inferer or SliceInferer(roi_size=tuple(volume.shape[1:3]), spatial_dim=2,
                                               sw_batch_size=self.slice_batch_size, overlap=0.0)
        x = torch.as_tensor(volume).as_subclass(torch.Tensor)[None].to(device, dtype=torch.float32)
        with torch.no_grad(), autocast(device, resolve_precision(self.precision, device)):
            out = inferer(x, self._slice_function(nets))
        out = torch.as_tensor(out).as_subclass(torch.Tensor)[0].float().cpu()
        count = len(nets)
        return out[:count], out[count:, 0, 0, :]

    def __call__(self, network, volume: torch.Tensor, channels: Sequence[str] | None = None,
                 brain: torch.Tensor | None = None, present: Sequence[str] | None = None) -> VolumeMaps:
        """Maps of the networks whose modality is among the volume's channels and has an input.

        Args:
            network: a MultiModalCAM (or a dict modality -> network).
            volume: (C, H, W, D) preprocessed volume.
            channels: the modality of each channel; default the networks' order (or
                MODALITIES for a 4-channel volume).
            brain: (D,) slices holding brain; default `brain_slices(volume)`. Maps and
                probabilities are zero elsewhere.
            present: the modalities that had an input file (`networks_to_run`); None = every channel.
        """
        nets = as_modality_nets(network)
        order = _channel_order(nets, volume.shape[0], channels)
        names = networks_to_run(nets, order, present)
        if not names:
            raise ValueError(f"channels {order} include none of the networks' modalities {list(nets)}")
        image = torch.as_tensor(volume).as_subclass(torch.Tensor)
        maps, probs = self.modality_maps([nets[m] for m in names], image[[order.index(m) for m in names]])
        brain = brain_slices(image) if brain is None else torch.as_tensor(brain).bool().reshape(-1)
        keep = brain.to(maps.dtype)
        maps, probs = maps * keep, probs * keep  # no brain: empty maps, no tumour
        fused = fuse_maps(maps[None], self.fusion)[0]
        return VolumeMaps(names=names, maps=maps, probabilities=probs, fused=fused,
                          mask=binarise(fused, self.threshold), brain=brain)


def volume_maps(nets, volume: torch.Tensor, method: str = "cam", batch_size: int = 32, gate: bool = True,
                tta: str | None = None, gate_threshold: float = 0.5, channels: Sequence[str] | None = None,
                precision: str | None = None) -> dict[str, torch.Tensor]:
    """dict modality -> (H, W, D) maps of every network over a volume (K, H, W, D); every
    slice is kept (no brain test). A convenience over `MapEngine` for scripts and figures."""
    engine = MapEngine(method=method, gate=gate, gate_threshold=gate_threshold, tta=tta,
                       slice_batch_size=batch_size, precision=precision)
    nets = as_modality_nets(nets)
    order = _channel_order(nets, volume.shape[0], channels)
    missing = [m for m in nets if m not in order]
    if missing:
        raise ValueError(f"channels {order} do not cover networks {missing}")
    result = engine(nets, volume, channels=order, brain=torch.ones(volume.shape[-1], dtype=torch.bool))
    return {m: result.maps[i] for i, m in enumerate(result.names)}
