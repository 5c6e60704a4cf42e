"""The network as bundle consumers run it: axial slices in, the fused whole-tumour map out.

`WholeTumourCAM` is `MultiModalCAM` (same weights, same state-dict keys, same settings) whose
`forward` ends where the method's per-slice steps end, so a consumer (MONAI Deploy's
MonaiBundleInferenceOperator, MONAI Label's bundle app, `monai.bundle.load`) needs nothing
but MONAI transforms around it:

    (B, K, H, W) slices -> per modality: tumour CAM, max-normalised, gated by that network's
    slice classification, or by the networks' mean one (`gate_source`; MultiModalCAM)
    -> pixel-wise max (or mean) over the modalities
    -> zero on slices without any non-zero voxel (no brain) -> (B, 1, H, W) in [0, 1]

Thresholding (AsDiscreted) and the inverse of the preprocessing (Invertd) follow in the
consumer config (configs/inference_deploy.yaml). MONAI has no transform for gating a map by
a slice classification or fusing maps of several networks, and a TorchScript file cannot
carry this package, so these steps live in the scripted module itself.

The bundle's own inference (scripts.workflows.inference.CAMMapEvaluator) uses the per-modality `nets`
through the map engine and writes the per-modality CAMs too; its fused map and mask equal
this module's on the same slices (tests/test_consumers.py).
"""

from __future__ import annotations

import torch

from scripts.model.cams import DEFAULT_FUSION, FUSIONS
from scripts.model.networks import MultiModalCAM


class WholeTumourCAM(MultiModalCAM):
    """MultiModalCAM whose forward returns the fused map `(B, 1, H, W)` (module docstring).

    Args:
        modalities: modality names, one network each, in channel order.
        fusion: "max" (the paper) or "mean" over the modalities' gated maps.
        kwargs: the rest of MultiModalCAM's arguments (backbone, base_channels, gate,
            gate_threshold, gate_source and the recorded data settings).
    """

    def __init__(self, modalities, fusion: str = DEFAULT_FUSION, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.gated_maps(x)
        if self.fusion == "max":
            fused = maps.amax(dim=1, keepdim=True)
        else:
            fused = maps.mean(dim=1, keepdim=True)
        # the map engine's rule: a slice without any non-zero voxel holds no brain, hence no tumour
        brain = (x != 0).flatten(1).any(dim=1).to(fused.dtype)
        return fused * brain[:, None, None, None]
