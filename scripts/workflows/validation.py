"""Per-volume validation during training, through the one map engine.

`CAMValidator` subclasses MONAI's `Evaluator`: one iteration = one validation volume,
whose axial slices go through every network in batches (`MapEngine`, the same route as
evaluation and inference); per-volume DSC per modality and for the fused map, and slice
classification accuracy, are averaged by ignite metrics.
"""

from __future__ import annotations

import torch
from ignite.metrics import Average
from monai.engines import Evaluator
from monai.metrics import compute_dice
from monai.utils import CommonKeys as Keys

from scripts.model.cams import DEFAULT_FUSION, DEFAULT_GATE_SOURCE, binarise
from scripts.precision import resolve_precision, to_memory_format
from scripts.runtime import as_flag
from scripts.workflows.map_engine import MapEngine


def _average(key: str) -> Average:
    return Average(output_transform=lambda out, key=key: out[key])


class CAMValidator(Evaluator):
    """Per-volume validation through the map engine (`scripts.workflows.map_engine.MapEngine`): the same
    gated, fused maps and masks as evaluation and inference.

    Slices without brain are given empty maps (they are not in the training index and a
    classifier has no business there). Empty-truth volumes score DSC 1 when the prediction
    is empty too and 0 otherwise (MONAI's ignore_empty=False). Metrics: `val_dsc_<map>` per
    modality and fused (the key metric), `val_acc_<modality>` slice classification accuracy
    over brain slices (probability > `gate_threshold`). The iteration's output also holds
    `Keys.PRED` (M+1, H, W, D: the maps then the fused map) and "mask" (1, H, W, D).

    Args:
        device: where the networks run.
        val_data_loader: volumes {"image": (1, K, H, W, D), "mask": (1, 1, H, W, D), optional
            "brain": (1, D)} (scripts.data.slices.VolumeDataset).
        network: the MultiModalCAM being trained.
        slice_batch_size: slices per forward.
        threshold: binarisation threshold of the maps (mask = map > threshold).
        gate: empty maps on slices a network classifies as healthy.
        map_kind: "cam" or "softmax" (the full-supervision upper bound).
        val_handlers: MONAI / ignite handlers to attach.
        amp: legacy switch, used only when `precision` is None.
        precision: auto | bf16 | fp16 | fp32 (`scripts.precision`).
        channels_last: store the networks' weights NHWC.
        gate_threshold: tumour probability a slice must exceed to keep its map.
        fusion: "max" or "mean" over the modalities.
        slice_normalization: the training slices' per-slice normalisation ("none" | "zscore").
        gate_source: whose slice probability opens a network's gate: "own" or "mean" (MapEngine).
    """

    def __init__(self, device, val_data_loader, network, slice_batch_size: int = 32, threshold: float = 0.5,
                 gate: bool = True, map_kind: str = "cam", val_handlers=None, amp: bool = False,
                 precision: str | None = None, channels_last: bool = False, gate_threshold: float = 0.5,
                 fusion: str = DEFAULT_FUSION, slice_normalization: str | None = "none",
                 gate_source: str = DEFAULT_GATE_SOURCE):
        if map_kind not in ("cam", "softmax"):
            raise ValueError(f"map_kind must be 'cam' or 'softmax', got {map_kind!r}")
        modalities = list(network.modalities)
        names = modalities + (["fused"] if len(modalities) > 1 else [])
        key = "val_dsc_fused" if len(modalities) > 1 else f"val_dsc_{modalities[0]}"
        additional = {f"val_dsc_{n}": _average(f"dsc/{n}") for n in names if f"val_dsc_{n}" != key}
        additional.update({f"val_acc_{m}": _average(f"acc/{m}") for m in modalities})
        device = torch.device(device)
        self.precision = resolve_precision(precision if precision is not None else ("auto" if amp else "fp32"), device)
        super().__init__(
            device=device, val_data_loader=val_data_loader, key_val_metric={key: _average(key.replace("val_dsc_", "dsc/"))},
            additional_metrics=additional, val_handlers=val_handlers, amp=self.precision != "fp32", decollate=False,
        )
        self.network = to_memory_format(network, channels_last)
        self.modalities = modalities
        # A fully supervised network's softmax maps are not gated (as before: gating is the CAM method's).
        self.engine = MapEngine(method=map_kind, gate=as_flag(gate, "gate") and map_kind == "cam", gate_threshold=gate_threshold,
                                fusion=fusion, threshold=threshold, slice_batch_size=slice_batch_size,
                                precision=self.precision, slice_normalization=slice_normalization,
                                gate_source=gate_source)

    def _iteration(self, engine, batchdata: dict) -> dict:
        """One volume -> {"dsc/<map>": float, "acc/<modality>": float, Keys.PRED, "mask"}."""
        self.network.eval()
        volume = batchdata["image"][0]
        truth = batchdata["mask"][0, 0] > 0.5  # (H, W, D)
        brain = batchdata.get("brain")
        result = self.engine(self.network, volume, channels=self.modalities,
                             brain=brain[0] if brain is not None else None)
        maps = {m: result.maps[k] for k, m in enumerate(result.names)}
        if len(result.names) > 1:
            maps["fused"] = result.fused
        output = {}
        for name, cam in maps.items():
            pred = binarise(cam, self.engine.threshold)[None, None].float()
            output[f"dsc/{name}"] = compute_dice(pred, truth[None, None].float(), ignore_empty=False).item()
        slice_labels = truth.flatten(0, 1).any(dim=0)  # (D,)
        counted = result.brain
        for k, name in enumerate(result.names):
            correct = ((result.probabilities[k] > self.engine.gate_threshold) == slice_labels) & counted
            output[f"acc/{name}"] = (correct.sum() / counted.sum().clamp_min(1)).item()
        output[Keys.PRED] = torch.cat([result.maps, result.fused[None]], dim=0)
        output["mask"] = result.mask[None]
        engine.state.output = output
        return output
