"""Test-time tumour maps from the per-modality CAM networks.

A network here is anything with the `scripts.model.networks` contract: `forward(x (B,1,H,W)) ->
maps (B,2,H,W)`, `features(x) -> (B,F,h,w)`, `classifier` (bias-free 1x1 conv) with
`forward(x) == classifier(features(x))`; channel `TUMOUR_CHANNEL` is the tumour and the
slice logits are the pooled maps (global average pool, or top-k when the network carries
`cam_pooling = "topk"`: `pooling_of`). `scripts.model.networks` is deliberately
not imported, so any module with that contract works (and tests use tiny stand-ins).

The one implementation of the method's per-slice primitives: the max-normaliser, the slice
logits (`logits_from_maps`: GAP or top-k pooling), the tumour probability (their softmax),
gating, fusion and binarisation, plus CAM /
GradCAM++ / softmax maps of a batch of slices and fixed-view test-time augmentation.
`scripts.model.networks` (the network's gated forward), `scripts.method.losses` (the CAMs of the loss
terms) and `scripts.workflows.map_engine` (volumes: validation, evaluation and inference) call these.
Masks come from `binarise` (strictly greater than the threshold, so a zero map is empty at
any threshold); gating has its own threshold (`gate_threshold`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Flip, InvertibleTransform, Rotate90
from monai.visualize.visualizer import default_upsampler

from scripts.common import TUMOUR_CHANNEL

METHODS = ("cam", "gradcampp", "softmax")  # softmax: a fully supervised network's mask
TTA_CHOICES = (None, "flips", "flips_rot90")
FUSIONS = ("max", "mean")
# configs/train.yaml `fusion` (max = the paper's); the Python defaults of every read-out follow it
DEFAULT_FUSION = "mean"
# Whose slice probability opens a network's gate: its own (each network decides alone), or the mean
# of every network's that runs on the slice (the modalities vote; docs/recipe.md, "Real scans").
GATE_SOURCES = ("own", "mean")
DEFAULT_GATE_SOURCE = "own"
EPS = 1e-8  # the authors' normaliser constant

# ---------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Put `net` in eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for module, was_training in flags:
            module.training = was_training


def max_normalise(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The authors' max-normaliser, per sample and channel over the last two (spatial) dims.

    `p = relu(p); p = relu(p - min - 1e-8) / (max - min + 1e-8)`; the result lies in [0, 1)
    and a constant map becomes zero. The one implementation: training losses, the network's
    forward, validation, evaluation and inference all call it (TorchScript-able).
    """
    p = F.relu(maps)
    low = p.amin(dim=(-2, -1), keepdim=True)
    high = p.amax(dim=(-2, -1), keepdim=True)
    return F.relu(p - low - eps) / (high - low + eps)


POOLINGS = ("gap", "topk")


def pooling_spec(pooling: str = "gap", topk_fraction: float = 0.05) -> str:
    """One string for a pooling and its parameter ("gap", "topk:0.05"): how a model records it.

    Args:
        pooling: "gap" (global average pooling, the paper) or "topk" (mean of the largest pixels).
        topk_fraction: fraction of a map's pixels that "topk" averages, in (0, 1].
    """
    if pooling not in POOLINGS:
        raise ValueError(f"cam_pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "gap":
        return "gap"
    fraction = float(topk_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    return f"topk:{fraction:g}"


def parse_pooling(spec: str | None) -> tuple[str, float]:
    """("gap", 1.0) or ("topk", fraction) from a `pooling_spec` string (None: the paper's GAP)."""
    if spec is None or spec == "gap":
        return "gap", 1.0
    kind, _, value = str(spec).partition(":")
    if kind != "topk" or not value:
        raise ValueError(f"unknown CAM pooling {spec!r}: expected 'gap' or 'topk:<fraction>'")
    return "topk", float(pooling_spec("topk", float(value))[5:])


def logits_from_maps(maps: torch.Tensor, pooling: str = "gap", topk_fraction: float = 1.0) -> torch.Tensor:
    """Slice-level logits (B, C) of the CAMs (B, C, H, W).

    "gap": global average pool (the paper's single-step CAM). "topk": the mean of each map's
    largest `topk_fraction` of pixels. Under GAP every pixel pulls on the logit equally, so on a
    small phantom slice the network can score a tumour slice by a shift spread over the whole
    map (even an inverted map, low on the tumour); top-k pooling only rewards the strongest
    pixels, which must then be where the evidence is (docs/recipe.md, "CAM pooling").
    """
    if pooling == "topk":
        flat = maps.flatten(-2)
        k = max(1, int(round(topk_fraction * flat.shape[-1])))
        return flat.topk(k, dim=-1).values.mean(dim=-1)
    return maps.mean(dim=(-2, -1))


def tumour_probability(maps: torch.Tensor, tumour_channel: int = TUMOUR_CHANNEL, pooling: str = "gap",
                       topk_fraction: float = 1.0) -> torch.Tensor:
    """Softmax tumour probability (B,) of the pooled logits of (B, C, H, W) maps."""
    return torch.softmax(logits_from_maps(maps, pooling, topk_fraction), dim=1)[:, tumour_channel]


def pooling_of(net: nn.Module) -> tuple[str, float]:
    """The (pooling, topk_fraction) a CAM network scores slices with (set by `MultiModalCAM`;
    a bare network without one uses the paper's GAP)."""
    net = _unwrap(net)
    return getattr(net, "cam_pooling", "gap"), float(getattr(net, "cam_topk_fraction", 1.0))


def gate_probabilities(probs: torch.Tensor, source: str = DEFAULT_GATE_SOURCE) -> torch.Tensor:
    """The probabilities (K, B) that open each of K networks' gates on B slices.

    Args:
        probs: (K, B) each network's tumour probability per slice.
        source: "own" (each network's gate follows its own probability) or "mean" (every gate
            follows the mean over the K networks: one shared decision per slice).
    """
    if source == "own":
        return probs
    if source == "mean":
        return probs.mean(dim=0, keepdim=True).expand_as(probs)
    raise ValueError(f"gate_source must be one of {GATE_SOURCES}, got {source!r}")


def gate_maps(maps: torch.Tensor, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Zero the maps (B, ...) of slices whose tumour probability (B,) is not above `threshold`.

    With the default 0.5 this is the 2-class argmax (a tie goes to 'healthy', as argmax does).
    The gating threshold is its own setting (`gate_threshold` in every config), separate from
    the binarisation threshold of `binarise`.
    """
    keep = (probs > threshold).to(maps.dtype)
    shape = [-1] + [1] * (maps.dim() - 1)
    return maps * keep.reshape(shape)


def _in_batches(x: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    if batch_size is None or batch_size >= x.shape[0]:
        return [x]
    return list(torch.split(x, batch_size, dim=0))


def _device_of(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _unwrap(net: nn.Module) -> nn.Module:
    """The bare network inside a DataParallel / DDP wrapper (the wrapper has no `features`)."""
    while not hasattr(net, "features") and isinstance(getattr(net, "module", None), nn.Module):
        net = net.module
    return net


def _upsample_to(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B,1,h,w) -> (B,1,H,W) with MONAI's CAM upsampler (bilinear), only when needed."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return default_upsampler(tuple(size))(maps)


# ---------------------------------------------------------------------------------------
# Per-slice maps


def _cam_batch(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: normalised tumour CAM (B,H,W) and tumour probability (B,)."""
    maps = net(x).float()  # under autocast the net gives bf16 / fp16: normalise in float32
    cam = max_normalise(maps[:, TUMOUR_CHANNEL])
    return cam, tumour_probability(maps, TUMOUR_CHANNEL, *pooling_of(net))


def _gradcampp_batch(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GradCAM++ of the tumour logit on the feature layer, for a whole batch at once.

    The score (tumour logit = pooled classifier(features)) depends on the features only
    through the classifier, so the backbone runs without a graph and autograd.grad is taken
    w.r.t. detached features: parameter .grad is never touched and nothing is retained.
    Summing the per-sample scores gives per-sample gradients because samples do not
    interact in eval mode. MONAI's GradCAMpp also multiplies the gradient by exp(score);
    that is a positive per-sample constant which cancels in the normalisation (and
    overflows float32 for logits > 88), so it is left out.
    """
    with torch.no_grad():
        feats = net.features(x)
    # The backbone may run under autocast; the 1x1 read-out, its gradient and the cubes of
    # the GradCAM++ weights run in float32.
    feats = feats.detach().float().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
        maps = net.classifier(feats)
        scores = logits_from_maps(maps, *pooling_of(net))[:, TUMOUR_CHANNEL]
        (grad,) = torch.autograd.grad(scores.sum(), feats)
    feats = feats.detach()
    b, c = grad.shape[:2]
    alpha_num = grad.pow(2)
    alpha_den = 2 * alpha_num + (feats * grad.pow(3)).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
    alpha_den = torch.where(alpha_den != 0.0, alpha_den, torch.ones_like(alpha_den))
    alpha = alpha_num / (alpha_den + 1e-7)  # same guard constants as monai.visualize.GradCAMpp
    weights = (alpha * F.relu(grad)).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
    raw = F.relu((weights * feats).sum(1, keepdim=True))
    raw = _upsample_to(raw, x.shape[-2:])
    return max_normalise(raw[:, 0]), tumour_probability(maps.detach(), TUMOUR_CHANNEL, *pooling_of(net))


def _softmax_batch(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise softmax probability of tumour: the map of the full-supervision upper bound."""
    maps = net(x).float()
    return torch.softmax(maps, dim=1)[:, TUMOUR_CHANNEL], tumour_probability(maps, TUMOUR_CHANNEL, *pooling_of(net))


_BATCH_FNS: dict[str, Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "cam": _cam_batch,
    "gradcampp": _gradcampp_batch,
    "softmax": _softmax_batch,
}


def maps_and_probabilities(
    net: nn.Module, x: torch.Tensor, method: str = "cam", batch_size: int | None = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised tumour maps (B,H,W) and tumour probabilities (B,) of slices x (B,1,H,W)."""
    if method not in _BATCH_FNS:
        raise ValueError(f"unknown map method {method!r}: expected one of {METHODS}")
    net = _unwrap(net)
    batch_fn = _BATCH_FNS[method]
    maps, probs = [], []
    with eval_mode(net), torch.no_grad():
        for chunk in _in_batches(x, batch_size):
            m, p = batch_fn(net, chunk)
            maps.append(m)
            probs.append(p)
    return torch.cat(maps), torch.cat(probs)


def cam_maps(net: nn.Module, x: torch.Tensor, batch_size: int | None = 32) -> torch.Tensor:
    """Tumour CAMs (B,H,W) of x (B,1,H,W): ReLU + per-sample max-normalisation, no grad."""
    return maps_and_probabilities(net, x, "cam", batch_size)[0]


def gradcampp_maps(net: nn.Module, x: torch.Tensor, batch_size: int | None = 32) -> torch.Tensor:
    """GradCAM++ maps (B,H,W) of the tumour logit on `net.features`, per-sample normalised."""
    return maps_and_probabilities(net, x, "gradcampp", batch_size)[0]


def slice_probabilities(net: nn.Module, x: torch.Tensor, batch_size: int | None = 32) -> torch.Tensor:
    """Tumour softmax probability (B,) of the pooled logits."""
    return maps_and_probabilities(net, x, "cam", batch_size)[1]


# ---------------------------------------------------------------------------------------
# Fusion and thresholding (torch tensors or NumPy arrays)


def fuse_maps(maps, how: str = "max"):
    """Pixel-wise fusion of (B,K,H,W) maps over the modality axis K -> (B,H,W)."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}: expected one of {FUSIONS}")
    if isinstance(maps, torch.Tensor):
        return maps.amax(dim=1) if how == "max" else maps.mean(dim=1)
    return np.max(maps, axis=1) if how == "max" else np.mean(maps, axis=1)


def binarise(maps, threshold: float = 0.5):
    """Boolean mask: map strictly greater than `threshold`."""
    return maps > threshold


# ---------------------------------------------------------------------------------------
# Test-time augmentation with MONAI's invertible transforms


def tta_transforms(tta: str | None) -> list[InvertibleTransform | None]:
    """The deterministic views of a TTA setting; None is the identity view.

    MONAI's TestTimeAugmentation draws random dictionary transforms and expects a
    dataset-style pipeline; a fixed finite set of exact views is simpler with the array
    transforms' own `inverse`.
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown tta {tta!r}: expected one of {TTA_CHOICES}")
    views: list[InvertibleTransform | None] = [None]
    if tta in ("flips", "flips_rot90"):
        views += [Flip(spatial_axis=0), Flip(spatial_axis=1)]
    if tta == "flips_rot90":
        views += [Rotate90(k=k, spatial_axes=(0, 1)) for k in (1, 2, 3)]
    return views


def _maps_of_view(net, x, view, method, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of one TTA view, mapped back to the input's frame with the view's inverse."""
    if view is None:
        return maps_and_probabilities(net, x, method, batch_size)
    # The slices' batch axis plays the channel axis of one MONAI channel-first item.
    moved = view(x[:, 0])
    maps, probs = maps_and_probabilities(net, moved.as_tensor().unsqueeze(1), method, batch_size)
    traced = MetaTensor(maps)
    traced.applied_operations = list(moved.applied_operations)
    back = view.inverse(traced)
    return back.as_tensor(), probs


def augmented_maps(
    net: nn.Module, x: torch.Tensor, method: str = "cam", tta: str | None = None, batch_size: int | None = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B,H,W) and probabilities (B,) averaged over the TTA views, maps re-normalised
    so that the 0.5 threshold keeps its meaning."""
    views = tta_transforms(tta)
    if len(views) == 1:
        return maps_and_probabilities(net, x, method, batch_size)
    results = [_maps_of_view(net, x, view, method, batch_size) for view in views]
    mean_maps = torch.stack([m for m, _ in results]).mean(0)
    mean_probs = torch.stack([p for _, p in results]).mean(0)
    if method == "softmax":  # already probabilities: no re-normalisation
        return mean_maps, mean_probs
    return max_normalise(mean_maps), mean_probs
