"""Stage 2 pseudo-masks: the trained CMER model's fused, gated maps of the training volumes.

    cached preprocessed volume (scripts.data.volumes.VolumeCache, images only)
      -> the one map engine (scripts.workflows.map_engine.MapEngine: gating, max fusion)  -> fused map
      -> written once per subject as `<subject>-<key>.fused.npy` in the pseudo-mask cache
      -> labels (`refine_labels`, cheap, at every run): fused > threshold, then the named
         refinement switches: largest connected component (per volume or per slice),
         confidence filtering (pixels whose fused map lies in
         (ignore_low, ignore_high] get the ignore label, left out of the loss)

No ground truth is read: the cache key holds the image files (path, size, time), the CAM
checkpoint's content hash, the engine and preprocessing settings, never the segmentation;
the maps come from the images alone (tests/stage2/test_stage2.py scrambles the segmentations
and gets identical pseudo-masks). Only the splits the workflow names are computed (training,
and validation when validating against pseudo-masks), never the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scripts.common import MODALITIES, atomic_path, canonical_modalities
from scripts.data.volumes import VolumeCache, _file_signature
from scripts.model.cams import DEFAULT_FUSION, fuse_maps
from scripts.workflows.map_engine import MapEngine
from scripts.model.networks import MultiModalCAM, model_settings
from scripts.runtime import BundleError, MissingCheckpoint, as_flag

logger = logging.getLogger(__name__)

PSEUDO_VERSION = 1
IGNORE_LABEL = 255
COMPONENT_SCOPES = ("volume", "slice")


def _image_files(record: dict) -> list[str]:
    """The record's image files only (never its segmentation)."""
    if "image4d" in record:
        return [record["image4d"]]
    return [record["images"][m] for m in sorted(record["images"])]


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (the checkpoint a pseudo-mask came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_cam_model(ckpt_path, device="cpu") -> MultiModalCAM:
    """The CMER model of `ckpt_path`, built from the settings it records, in eval mode."""
    if not Path(ckpt_path).is_file():
        raise MissingCheckpoint(f"no CMER model at {ckpt_path}: stage 2 learns from its pseudo-masks. Fix: train "
                                f"stage 1 first (python -m monai.bundle run training --config_file configs/train.yaml) "
                                f"or pass --stage1_ckpt_path PATH.")
    settings = model_settings(ckpt_path)
    net = MultiModalCAM(settings["modalities"], backbone=settings["backbone"], base_channels=settings["base_channels"],
                        spacing=settings["spacing"], spatial_size=settings["spatial_size"],
                        normalization=settings["normalization"], slice_normalization=settings["slice_normalization"])
    net.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True))
    return net.to(device).eval()


class PseudoMaskCache:
    """Fused CMER maps of subjects, computed once through the map engine and kept on disk.

    Args:
        cache_dir: folder of the pseudo-mask files (created on first use; files written atomically).
        ckpt_path: the trained CMER model (models/model.pt); its settings are read from it.
        volume_cache: the VolumeCache of the preprocessed volumes (train.yaml's).
        device: where the CAM networks run.
        method: "cam" (the paper) or "gradcampp".
        gate: empty maps on slices a network classifies as healthy.
        gate_threshold: tumour probability a slice must exceed to keep its map.
        fusion: "max" (the paper) or "mean".
        threshold: binarisation threshold of the fused map (the engine's `threshold`).
        map_modalities: the modalities whose maps are fused into the pseudo-mask; None = every
            network of the model (the paper's fusion); a list, e.g. ["flair"]; or "auto": the
            networks whose slice accuracy on `selection_records` reaches `min_slice_accuracy`
            (scripts/stage2/selection.py; slice labels only).
        selection_records: the subjects "auto" scores the networks on (the validation split).
        min_slice_accuracy: the slice accuracy (0-1) a network needs under "auto".
        slice_batch_size: slices per forward.
        precision: autocast of the networks (scripts.precision); None = fp32.
    """

    def __init__(self, cache_dir, ckpt_path, volume_cache: VolumeCache, device="cpu", method: str = "cam",
                 gate: bool = True, gate_threshold: float = 0.5, fusion: str = DEFAULT_FUSION, threshold: float = 0.5,
                 slice_batch_size: int = 32, precision: str | None = None,
                 map_modalities: Sequence[str] | str | None = None, selection_records: Sequence[dict] = (),
                 min_slice_accuracy: float = 0.9):
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.ckpt_path = str(ckpt_path)
        self.volume_cache = volume_cache
        self.device = torch.device(device)
        self.threshold = float(threshold)
        self.engine_settings = {"method": method, "gate": as_flag(gate, "pseudo_gate"),
                                "gate_threshold": float(gate_threshold), "fusion": fusion, "threshold": float(threshold)}
        word = map_modalities.strip().lower() if isinstance(map_modalities, str) else None
        self.auto = word == "auto"
        if word in ("null", "none", "all"):  # `--pseudo_modalities null` arrives as the string 'null'
            map_modalities = None
        self.map_modalities = None if map_modalities is None or self.auto else canonical_modalities(map_modalities)
        self.selection_records = list(selection_records)
        self.min_slice_accuracy = float(min_slice_accuracy)
        self.slice_accuracy: dict[str, float] = {}  # filled by "auto"
        self.slice_batch_size = int(slice_batch_size)
        self.precision = precision
        self._model: MultiModalCAM | None = None
        self._digest: str | None = None
        self.computed = 0  # subjects whose maps were computed (not read from the cache), for the tests

    @property
    def model(self) -> MultiModalCAM:
        if self._model is None:
            self._model = load_cam_model(self.ckpt_path, self.device)
        return self._model

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)

    @property
    def fused_modalities(self) -> list[str]:
        """The modalities whose maps make the pseudo-mask (checked against the model's networks)."""
        if self.auto and self.map_modalities is None:
            self.map_modalities = self._select()
        if self.map_modalities is None:
            return self.modalities
        missing = [m for m in self.map_modalities if m not in self.modalities]
        if missing:
            raise ValueError(f"pseudo_modalities {missing} have no network in the CMER model {self.ckpt_path} "
                             f"(it has {self.modalities}). Fix: choose among {self.modalities} or null for all.")
        return list(self.map_modalities)

    def _select(self) -> list[str]:
        from scripts.stage2.selection import choose_modalities, slice_accuracies

        self.slice_accuracy = slice_accuracies(self.model, self.volume_cache, self.selection_records,
                                               self.engine_settings["gate_threshold"], self.slice_batch_size,
                                               self.precision)
        chosen = choose_modalities(self.slice_accuracy, self.min_slice_accuracy)
        scores = ", ".join(f"{m} {100 * a:.1f}" for m, a in self.slice_accuracy.items())
        print(f"[stage2] pseudo-mask maps (auto: validation slice accuracy >= {100 * self.min_slice_accuracy:.0f} %, "
              f"{len(self.selection_records)} subjects; {scores}): {', '.join(chosen)}", flush=True)
        return chosen

    def key(self, record: dict) -> str:
        """Hash of what the maps depend on: images, CAM weights, engine and preprocessing."""
        if self._digest is None:
            self._digest = file_digest(self.ckpt_path)
        cache = self.volume_cache
        engine = dict(self.engine_settings)
        if self.map_modalities is not None or self.auto:  # in the key only when set: the default's names stay
            engine["map_modalities"] = self.fused_modalities
        recipe = {"version": PSEUDO_VERSION, "checkpoint": self._digest, "engine": engine,
                  "spatial_size": cache.spatial_size, "spacing": cache.spacing, "normalization": cache.normalization,
                  "channels": record.get("channels"), "images": [_file_signature(p) for p in _image_files(record)]}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.volume_cache.key(record).rsplit('-', 1)[0]}-{digest}"

    def path(self, record: dict) -> Path:
        return self.cache_dir / f"{self.key(record)}.fused.npy"

    def compute(self, record: dict, modalities: Sequence[str] | None = None) -> np.ndarray:
        """(H, W, D) float32 fused map of one subject through the map engine (not cached).

        Args:
            record: the subject's datalist record.
            modalities: whose maps are fused; default `fused_modalities` (the pseudo-masks').
        """
        return self.compute_groups(record, [self.fused_modalities if modalities is None else modalities])[0]

    def compute_groups(self, record: dict, groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """One (H, W, D) float32 fused map per group of modalities, from one engine pass.

        Each network's gated map does not depend on the others, so the union of the groups runs
        once and each group is the fusion of its networks' maps (the report's stage-1 rows).

        Args:
            record: the subject's datalist record.
            groups: lists of modalities, each fused on its own.
        """
        wanted = [m for m in self.modalities if any(m in group for group in groups)]
        volume = self.volume_cache.get(record)
        settings = self.model.settings
        engine = MapEngine(method=self.engine_settings["method"], gate=self.engine_settings["gate"],
                           gate_threshold=self.engine_settings["gate_threshold"], fusion=self.engine_settings["fusion"],
                           threshold=self.threshold, slice_batch_size=self.slice_batch_size, precision=self.precision,
                           slice_normalization=settings.slice_normalization)
        channels = [MODALITIES.index(m) for m in self.modalities]
        image = torch.as_tensor(volume["image"])[channels]
        nets = dict(zip(self.modalities, self.model.nets))
        result = engine({m: nets[m] for m in wanted}, image, channels=self.modalities, brain=volume["brain"])
        self.computed += 1
        fused = []
        for group in groups:
            maps = result.maps[[result.names.index(m) for m in group]]
            fused.append(fuse_maps(maps[None], self.engine_settings["fusion"])[0].numpy().astype(np.float32))
        return fused

    def fused(self, record: dict) -> np.ndarray:
        """(H, W, D) float32 fused map of one subject, from the cache or computed and cached."""
        target = self.path(record)
        if target.is_file():
            try:
                return np.load(target)
            except (OSError, ValueError) as err:
                logger.warning("pseudo-mask file %s unreadable (%s): recomputing", target, err)
        fused = self.compute(record)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, fused)
        return fused

    def build(self, records: Sequence[dict]) -> int:
        """Compute (or find) the fused maps of `records`; returns how many were computed now."""
        before = self.computed
        for record in records:
            self.fused(record)
        made = self.computed - before
        print(f"[stage2] pseudo-masks of {len(records)} subject(s): {made} computed, {len(records) - made} from the "
              f"cache {self.cache_dir}", flush=True)
        return made


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a bool mask (2D or 3D).

    MONAI's KeepLargestConnectedComponent does this but needs scikit-image (or cuCIM on a
    GPU), which the bundle does not require; scipy.ndimage.label (scipy is required) gives the
    same components (connectivity 1).
    """
    from scipy import ndimage

    components, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def refine_labels(fused: np.ndarray, threshold: float = 0.5, largest_component: bool = False,
                  component_scope: str = "volume", confidence_filter: bool = False, ignore_low: float = 0.3,
                  ignore_high: float = 0.7, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """(H, W, D) uint8 training labels from a fused map: 0 background, 1 tumour, `ignore_label`.

    Args:
        fused: (H, W, D) fused map in [0, 1].
        threshold: tumour = fused > threshold.
        largest_component: keep only the largest connected tumour component
            (`largest_component_mask`), removing scattered activations.
        component_scope: "volume" (one 3D component) or "slice" (the largest per axial slice).
        confidence_filter: give pixels with ignore_low < fused <= ignore_high the ignore label.
        ignore_low: lower end of the undecided band.
        ignore_high: upper end of the undecided band.
        ignore_label: the label value the loss ignores.
    """
    if component_scope not in COMPONENT_SCOPES:
        raise BundleError(f"component_scope must be one of {list(COMPONENT_SCOPES)}, got {component_scope!r}.")
    if confidence_filter and not ignore_low < ignore_high:
        raise BundleError(f"the confidence band needs ignore_low < ignore_high, got {ignore_low} and {ignore_high}.")
    fused = np.asarray(fused, dtype=np.float32)
    mask = fused > threshold
    if largest_component and mask.any():
        if component_scope == "volume":
            mask = largest_component_mask(mask)
        else:
            for z in np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0)):
                mask[:, :, z] = largest_component_mask(mask[:, :, z])
    labels = mask.astype(np.uint8)
    if confidence_filter:
        labels[(fused > ignore_low) & (fused <= ignore_high)] = ignore_label
    return labels


class PseudoLabels:
    """Training labels of subjects: their cached fused maps through `refine_labels`.

    Args:
        pseudo: the PseudoMaskCache.
        threshold: tumour = fused > threshold.
        refine: the refinement switches (keys of `refine_labels`: largest_component,
            component_scope, confidence_filter, ignore_low, ignore_high, ignore_label).
    """

    def __init__(self, pseudo: PseudoMaskCache, threshold: float = 0.5, refine: dict | None = None):
        self.pseudo = pseudo
        self.threshold = float(threshold)
        self.refine = dict(refine or {})
        for flag in ("largest_component", "confidence_filter"):  # `--stage2_refine#... false` arrives as 'false'
            if flag in self.refine:
                self.refine[flag] = as_flag(self.refine[flag], f"stage2_refine#{flag}")
        self._labels: dict[str, np.ndarray] = {}

    @property
    def ignore_label(self) -> int:
        return int(self.refine.get("ignore_label", IGNORE_LABEL))

    def labels(self, record: dict) -> np.ndarray:
        key = str(record["subject"])
        if key not in self._labels:
            self._labels[key] = refine_labels(self.pseudo.fused(record), self.threshold, **self.refine)
        return self._labels[key]

    def binary(self, record: dict) -> np.ndarray:
        """(H, W, D) bool: the refined tumour pixels (ignored pixels count as background)."""
        return self.labels(record) == 1


def modality_channels(modalities: Sequence[str]) -> list[int]:
    return [MODALITIES.index(m) for m in canonical_modalities(modalities)]


class PseudoSliceDataset(torch.utils.data.Dataset):
    """Axial slices that hold brain, with pseudo-mask labels: {"image": (K, H, W), "label": (1, H, W)}.

    The slice index comes from the cache's brain fractions only (not from its tumour counts,
    which are ground truth). Tumour-free slices stay in, so the network learns the empty answer.

    Args:
        records: training subjects.
        cache: the VolumeCache of the preprocessed volumes.
        labels: the PseudoLabels giving each subject's labels.
        modalities: input channels, in order.
        brain_threshold: a slice is kept when its brain fraction is above this.
        transform: MONAI dictionary transform applied to each item (augmentation), or None.
    """

    def __init__(self, records: Sequence[dict], cache: VolumeCache, labels: PseudoLabels,
                 modalities: Sequence[str], brain_threshold: float = 0.0, transform=None):
        self.records = list(records)
        self.cache, self.labels = cache, labels
        self.channels = modality_channels(modalities)
        self.transform = transform
        self.index = [(i, z) for i, record in enumerate(self.records)
                      for z, fraction in enumerate(cache.info(record)["brain_fraction"]) if fraction > brain_threshold]
        if not self.index:
            raise BundleError(f"no brain slice in the {len(self.records)} training subject(s) for stage 2. Fix: check "
                              f"the datalist's training split and brain_threshold.")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        record_index, z = self.index[item]
        record = self.records[record_index]
        image, _ = self.cache.get_slice(record, z)
        label = self.labels.labels(record)[:, :, z]
        data = {"image": torch.from_numpy(image[self.channels]),
                "label": torch.from_numpy(label[None].astype(np.int64))}
        return self.transform(data) if self.transform is not None else data


class Stage2VolumeDataset(torch.utils.data.Dataset):
    """Whole volumes for stage-2 validation: {"image": (K, H, W, D), "label": (1, H, W, D), "subject"}.

    Args:
        records: validation subjects.
        cache: the VolumeCache of the preprocessed volumes.
        modalities: input channels, in order.
        target: "pseudo" (the validation split's refined pseudo-masks: weak supervision kept) or
            "ground_truth" (the segmentations: breaks weak supervision, for reference only).
        labels: the PseudoLabels (needed for target "pseudo").
    """

    TARGETS = ("pseudo", "ground_truth")

    def __init__(self, records: Sequence[dict], cache: VolumeCache, modalities: Sequence[str], target: str = "pseudo",
                 labels: PseudoLabels | None = None):
        if target not in self.TARGETS:
            raise BundleError(f"--stage2_validate_against must be one of {list(self.TARGETS)}, got {target!r}.")
        if target == "pseudo" and labels is None:
            raise ValueError("target 'pseudo' needs the PseudoLabels")
        self.records, self.cache, self.target, self.labels = list(records), cache, target, labels
        self.channels = modality_channels(modalities)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        record = self.records[item]
        volume = self.cache.get(record)
        if self.target == "pseudo":
            label = torch.from_numpy(self.labels.binary(record)[None].astype(np.float32))
        else:
            label = volume["mask"].float()
        return {"image": volume["image"][self.channels].contiguous(), "label": label, "subject": volume["subject"]}


def stage1_checked_settings(ckpt_path, spacing, spatial_size, normalization) -> dict:
    """The CMER model's settings; its recorded geometry must be the volume cache's (one-line error).

    Args:
        ckpt_path: the CMER model (models/model.pt); defaults when it does not exist yet.
        spacing: the volume cache's spacing (train.yaml's `spacing`).
        spatial_size: the volume cache's in-plane size.
        normalization: the volume cache's intensity normalisation.
    """
    if not os.path.isfile(ckpt_path):
        return model_settings(None)
    return model_settings(ckpt_path, spacing=spacing, spatial_size=spatial_size, normalization=normalization)


def require_cam_model(ckpt_path, spacing=None, spatial_size=None, normalization=None) -> str:
    """Stop before any work when the CMER model is missing or was trained on another geometry.

    Args:
        ckpt_path: the CMER model stage 2 learns from.
        spacing: the volume cache's spacing (checked against the model's record).
        spatial_size: the volume cache's in-plane size (checked).
        normalization: the volume cache's normalisation (checked).
    """
    if not Path(ckpt_path).is_file():
        raise MissingCheckpoint(f"no CMER model at {ckpt_path}: stage 2 learns from its pseudo-masks. Fix: train "
                                f"stage 1 first (python -m monai.bundle run training --config_file configs/train.yaml) "
                                f"or pass --stage1_ckpt_path PATH (or the --ckpt_dir that holds model.pt).")
    stage1_checked_settings(ckpt_path, spacing, spatial_size, normalization)
    return str(ckpt_path)
