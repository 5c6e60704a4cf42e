"""The benchmark's `maps` part: batched GradCAM++ (`scripts.model.cams.gradcampp_maps`) against
MONAI's `GradCAMpp` one slice at a time and pytorch-grad-cam when installed.
"""

from __future__ import annotations

import copy

import torch

from scripts.common import TUMOUR_CHANNEL
from tools.benchmark.core import MAX_MAP_DIFFERENCE, MIN_GRADCAM_SPEEDUP, Row, Settings, full_precision, synthetic_batch, time_calls, verdict


class LogitsOf(torch.nn.Module):
    """What MONAI's CAM tools expect: forward -> slice logits (GAP of the maps)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).mean(dim=(-2, -1))


def monai_gradcampp_raw(cam, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's GradCAMpp one slice at a time (its documented use): raw maps (B,H,W) and scores (B,)."""
    raw, scores = [], []
    for i in range(x.shape[0]):
        raw.append(cam(x[i:i + 1], class_idx=TUMOUR_CHANNEL)[:, 0])
        scores.append(cam.nn_module.score.detach().reshape(1))
    return torch.cat(raw).detach(), torch.cat(scores)


def monai_gradcampp_maps(cam, x: torch.Tensor, without_exp: bool = False) -> torch.Tensor:
    """MONAI's maps with our normaliser; `without_exp` divides out the exp(score) factor that
    MONAI puts on the gradient and scripts.model.cams leaves out (a per-slice constant, which only
    the normaliser's 1e-8 constant can see: at random init the raw maps are ~1e-6)."""
    from scripts.model.cams import max_normalise

    raw, scores = monai_gradcampp_raw(cam, x)
    if without_exp:
        raw = raw / scores.exp().reshape(-1, 1, 1)
    return max_normalise(raw)


def pytorch_grad_cam_maps(net, x: torch.Tensor):
    """pytorch-grad-cam's GradCAMPlusPlus if installed, else None."""
    try:
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    model = LogitsOf(net).eval()
    cam = GradCAMPlusPlus(model=model, target_layers=[net.head])
    targets = [ClassifierOutputTarget(TUMOUR_CHANNEL)] * x.shape[0]
    return lambda: torch.from_numpy(cam(input_tensor=x, targets=targets))


def map_rows(s: Settings) -> list[Row]:
    from monai.visualize import GradCAMpp

    from scripts.model.cams import gradcampp_maps, max_normalise
    from scripts.model.networks import UNetCAM

    torch.manual_seed(0)
    net = UNetCAM(base_channels=s.base_channels).to(s.device).eval()
    x = synthetic_batch(s.gradcam_slices, 1, s.largest)["image"].to(s.device)
    # MONAI registers hooks for good and writes parameter gradients: give it its own copy.
    monai_cam = GradCAMpp(LogitsOf(copy.deepcopy(net)), target_layers="net.head", postprocessing=lambda m: m)
    ours_s = time_calls(lambda: gradcampp_maps(net, x, s.slice_batch_size), s)
    monai_s = time_calls(lambda: monai_gradcampp_maps(monai_cam, x), s)
    with full_precision():
        ours_maps = gradcampp_maps(net, x, s.slice_batch_size)
        difference = float((ours_maps - monai_gradcampp_maps(monai_cam, x, without_exp=True)).abs().max())
        with_exp = float((ours_maps - monai_gradcampp_maps(monai_cam, x)).abs().max())
    n, speedup = x.shape[0], monai_s / ours_s
    case = f"GradCAM++ {n} slices {s.largest}x{s.largest}, base {s.base_channels}"
    rows = [
        Row("maps", f"{case}: ours (batched) vs MONAI GradCAMpp (batch-1 loop)", f"{n / ours_s:.2f} slices/s",
            f"MONAI {n / monai_s:.2f} slices/s", f"{speedup:.1f}x", f">= {MIN_GRADCAM_SPEEDUP:g}x",
            verdict(speedup >= MIN_GRADCAM_SPEEDUP)),
        Row("maps", "max abs difference ours - MONAI, normalised maps (MONAI's exp(score) divided out; no TF32)",
            f"{difference:.2e}", f"with MONAI's exp(score) kept: {with_exp:.2e}", "", f"<= {MAX_MAP_DIFFERENCE:g}",
            verdict(difference <= MAX_MAP_DIFFERENCE)),
    ]
    other = pytorch_grad_cam_maps(copy.deepcopy(net), x)
    if other is None:
        rows.append(Row("maps", "pytorch-grad-cam GradCAMPlusPlus", "absent (not installed: it pulls in "
                        "opencv-python and scikit-learn)", verdict="n/a"))
    else:
        other_s = time_calls(other, s)
        with full_precision():
            other_difference = float((max_normalise(other().to(s.device)) - ours_maps).abs().max())
        rows.append(Row("maps", "pytorch-grad-cam GradCAMPlusPlus (batched)", f"{n / other_s:.2f} slices/s",
                        f"ours {n / ours_s:.2f} slices/s", f"ours {other_s / ours_s:.1f}x",
                        "", f"max diff {other_difference:.1e}"))
    return rows
