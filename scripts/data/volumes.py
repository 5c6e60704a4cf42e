"""Volumes: loading with grid checks, the one preprocessing per subject, the slice-major cache.

`load_volume` / `check_same_grid` turn unreadable, non-finite or misaligned files into a
`DataError` naming the file; `preprocess_subject` runs `scripts.data.preprocessing`'s Compose
(the one inference runs) on one subject; `VolumeCache` keeps the result on disk as
memory-mapped slice-major `.npy` files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scripts.common import MODALITIES, atomic_path, atomic_write_json, canonical_modalities, canonical_modality
from scripts.data.headers import check_nifti_header
from scripts.data.subjects import NIFTI_SUFFIXES, DataError

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE = 1e-3
CACHE_VERSION = 2  # 2: the shared preprocessing (Spacingd, brain after preprocessing)
# Volume normalisations of scripts.data.preprocessing (defined here: this module imports no monai).
NORMALIZATIONS = ("volume", "robust", "none")


# --------------------------------------------------------------------------- loading + checks


def _reader_for(path: str):
    """NibabelReader for NIfTI, ITKReader for everything else (nrrd, nhdr, mha, mhd)."""
    from monai.data import ITKReader, NibabelReader

    return NibabelReader() if path.lower().endswith(NIFTI_SUFFIXES) else ITKReader()


def load_volume(path: str, subject: str, role: str):
    """One volume as a channel-first MetaTensor; every failure becomes a DataError naming the file."""
    from monai.transforms import LoadImaged

    if not os.path.isfile(path):
        raise DataError(f"subject {subject}: {role} file {path} does not exist. Fix: restore the file, or "
                        f"rewrite the datalist (`python -m scripts.data.datalist datalist`) if the data moved.")
    check_nifti_header(path, subject, role)  # voxel size 0 (error), no orientation (warning)
    loader = LoadImaged(keys="volume", reader=_reader_for(path), image_only=True, ensure_channel_first=True)
    try:
        volume = loader({"volume": path})["volume"]
    except Exception as err:  # nibabel/ITK raise many types (EOFError, zlib.error, RuntimeError, ...)
        raise DataError(f"subject {subject}: cannot read {role} file {path} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). The file is unreadable or truncated "
                        f"(e.g. an interrupted download or copy). Fix: re-extract or re-download it.") from err
    bad_voxels = int((~torch.isfinite(volume)).sum())
    if bad_voxels:
        raise DataError(f"subject {subject}: {role} file {path} has {bad_voxels} NaN/inf voxels. Fix: repair the "
                        f"volume (e.g. replace non-finite values by 0) or remove the subject from the datalist.")
    if volume.ndim != 4:
        raise DataError(f"subject {subject}: {role} file {path} has shape {tuple(volume.shape[1:])}, "
                        f"not a 3D volume. Fix: give a 3D (or, for 'image', a 4D) volume.")
    return volume


def _load_channels(record: dict, subject: str, allow_missing: bool):
    """{modality: (1, X, Y, Z) MetaTensor} from per-modality files or one 4D file, plus their files."""
    if "image4d" in record:
        path = record["image4d"]
        channels = canonical_modalities(record["channels"])
        volume = load_volume(path, subject, "4D image")
        if volume.shape[0] != len(channels):
            raise DataError(f"subject {subject}: 4D image {path} has {volume.shape[0]} channels, expected "
                            f"{len(channels)} ({', '.join(channels)}). Fix: use the 4-channel MSD Task01 image, or "
                            f"set 'channels' in the datalist to the names of its channels in order.")
        loaded = {m: volume[i:i + 1] for i, m in enumerate(channels)}
        files = {m: path for m in channels}
    else:
        files = {canonical_modality(m): p for m, p in record["images"].items()}
        loaded = {m: load_volume(p, subject, m) for m, p in files.items()}
        for modality, volume in loaded.items():
            if volume.shape[0] != 1:
                raise DataError(f"subject {subject}: {modality} file {files[modality]} holds {volume.shape[0]} "
                                f"volumes (a 4D image); one 3D volume per modality file was expected. Fix: split it.")
    missing = [m for m in MODALITIES if m not in loaded]
    if missing and not allow_missing:
        raise DataError(f"subject {subject}: no {missing} volume (files: {sorted(set(files.values()))}). Fix: add "
                        f"the missing modality file(s), or pass --allow_missing true to zero-fill them.")
    return loaded, files


def check_same_grid(volumes: dict, files: dict, subject: str) -> None:
    """Every volume must share the first one's shape and affine (compared before reorientation)."""
    reference_name = next(iter(volumes))
    reference = volumes[reference_name]
    for name, volume in volumes.items():
        if tuple(volume.shape[1:]) != tuple(reference.shape[1:]):
            raise DataError(f"subject {subject}: {name} file {files[name]} has shape {tuple(volume.shape[1:])} but "
                            f"{reference_name} file {files[reference_name]} has {tuple(reference.shape[1:])}; all "
                            f"modalities and the seg must share one voxel grid. Fix: resample it onto the "
                            f"{reference_name} grid or remove the subject.")
        if not np.allclose(np.asarray(volume.affine), np.asarray(reference.affine), atol=AFFINE_TOLERANCE):
            raise DataError(f"subject {subject}: {name} file {files[name]} has affine\n"
                            f"{np.asarray(volume.affine).round(4)}\nbut {reference_name} file {files[reference_name]} "
                            f"has\n{np.asarray(reference.affine).round(4)}\n(tolerance {AFFINE_TOLERANCE}). Fix: "
                            f"register/resample it onto the {reference_name} grid, or fix its header.")


def preprocess_subject(record: dict, spatial_size: Sequence[int] | None = None, normalization: str = "volume",
                       allow_missing: bool = False, spacing=None) -> dict:
    """Load one subject and run the one preprocessing (`scripts.data.preprocessing`) on it.

    Returns image float32 (4, H, W, D) in MODALITIES order, mask uint8 (H, W, D) whole tumour,
    brain bool (H, W, D) (non-zero in any modality after preprocessing, the test the map
    engine applies to any input), spacing (3,), present [modalities with data].
    """
    from monai.transforms import ConcatItemsd

    from scripts.data.preprocessing import volume_preprocessing

    subject = str(record["subject"])
    loaded, files = _load_channels(record, subject, allow_missing)
    if record.get("seg"):
        loaded["seg"] = load_volume(record["seg"], subject, "seg")
        files["seg"] = record["seg"]
        if loaded["seg"].shape[0] != 1:
            raise DataError(f"subject {subject}: seg file {record['seg']} holds {loaded['seg'].shape[0]} volumes; "
                            f"one 3D label map was expected.")
    check_same_grid(loaded, files, subject)
    from scripts.data.sanity import label_warnings, volume_warnings

    images = {m: v for m, v in loaded.items() if m != "seg"}
    warnings = volume_warnings(images, files, subject, seg=loaded.get("seg"))
    if "seg" in loaded:
        warnings += label_warnings(loaded["seg"], record["seg"], subject, record.get("layout"))
    reference = next(iter(loaded.values()))
    data = {m: loaded.get(m, torch.zeros_like(reference)) for m in MODALITIES}  # zero-fill (allow_missing)
    data["seg"] = loaded.get("seg", torch.zeros_like(reference))
    data = ConcatItemsd(keys=list(MODALITIES), name="image", dim=0)(data)
    preprocessing = volume_preprocessing(spacing, spatial_size, normalization, image_keys=["image"],
                                         label_keys=["seg"])
    data = preprocessing({"image": data["image"], "seg": data["seg"]})
    return {
        "image": np.ascontiguousarray(data["image"].numpy(), dtype=np.float32),
        "mask": (data["seg"][0].numpy() > 0).astype(np.uint8),
        "brain": (data["image"] != 0).any(dim=0).numpy(),
        "spacing": [float(s) for s in data["image"].pixdim],
        "present": [m for m in MODALITIES if m in loaded],
        "has_mask": "seg" in loaded,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- cache


def _source_files(record: dict) -> list[str]:
    files = [record["image4d"]] if "image4d" in record else [record["images"][m] for m in sorted(record["images"])]
    return files + ([record["seg"]] if record.get("seg") else [])


def _file_signature(path: str) -> list:
    """Path, size and mtime: enough to notice a replaced or edited source file."""
    try:
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), None, None]


def _safe_name(subject: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", subject)[:80]


class VolumeCache:
    """Preprocessed subjects on disk: `(D, 4, H, W)` float32 + `(D, H, W)` uint8 `.npy` files.

    Slice-major storage makes one axial slice a contiguous read from the memory map, so a
    BraTS-size dataset never has to fit in RAM; the few most recent subjects' maps stay open
    (`memory_items`), which together with the OS page cache keeps a small phantom in memory.
    `.builds` counts preprocessing runs and `.disk_loads` cache file opens (used by the tests).
    The preprocessing is `scripts.data.preprocessing.volume_preprocessing`, the one inference runs.

    Args:
        cache_dir: folder of the cache files (created on first use).
        spatial_size: in-plane (H, W) the volumes are padded / cropped to; None derives it
            from `spacing` (240 mm field of view), or keeps the size without a spacing.
        normalization: "volume" (z-score over brain voxels per modality), "robust" (the same
            after clipping to the brain's 0.5-99.5th percentiles) or "none".
        allow_missing: zero-fill a missing modality instead of raising.
        memory_items: subjects whose memory maps stay open.
        spacing: voxel spacing (mm, one value or three) volumes are resampled to; None keeps
            each input's grid.
    """

    def __init__(self, cache_dir: str | os.PathLike, spatial_size: Sequence[int] | None = None,
                 normalization: str = "volume", allow_missing: bool = False, memory_items: int = 8, spacing=None):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if spatial_size is not None and len(spatial_size) != 2:
            raise ValueError(f"spatial_size is the in-plane (H, W), got {spatial_size}")
        from scripts.data.preprocessing import target_pixdim

        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.spacing = target_pixdim(spacing)
        self.normalization = normalization
        from scripts.runtime import as_flag  # lazy: runtime's error hook imports the data layer

        self.allow_missing = as_flag(allow_missing, "allow_missing")
        self.memory_items = memory_items
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.builds = 0
        self.disk_loads = 0

    def __getstate__(self):  # DataLoader workers: reopen the memory maps instead of pickling them
        state = dict(self.__dict__)
        state["_memory"] = OrderedDict()
        return state

    def key(self, record: dict) -> str:
        """Hash of the source files (path, size, mtime) and the preprocessing parameters."""
        recipe = {"version": CACHE_VERSION, "spatial_size": self.spatial_size, "normalization": self.normalization,
                  "spacing": self.spacing,
                  "channels": record.get("channels"), "images": sorted(record.get("images", {})),
                  "sources": [_file_signature(p) for p in _source_files(record)]}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return f"{_safe_name(str(record['subject']))}-{digest}"

    def _files(self, key: str) -> tuple[Path, Path, Path]:
        return (self.cache_dir / f"{key}.image.npy", self.cache_dir / f"{key}.mask.npy",
                self.cache_dir / f"{key}.json")

    def info(self, record: dict) -> dict:
        """Per-subject metadata (shape, spacing, brain_fraction and tumour_pixels per slice) without mapping images."""
        key = self.key(record)
        if key in self._memory:
            return self._memory[key]["meta"]
        return self._checked(self._read_meta(key) or self._build(record, key), record)

    def _checked(self, meta: dict, record: dict) -> dict:
        """A zero-filled entry (written by an allow_missing cache) is an error for a strict cache."""
        missing = [m for m in MODALITIES if m not in meta["present"]]
        if missing and not self.allow_missing:
            raise DataError(f"subject {record['subject']}: no {missing} volume (files: {_source_files(record)}). "
                            f"Fix: add the missing modality file(s), or pass --allow_missing true to zero-fill them.")
        return meta

    def _read_meta(self, key: str) -> dict | None:
        image_file, mask_file, meta_file = self._files(key)
        if not (meta_file.is_file() and image_file.is_file() and mask_file.is_file()):
            return None
        try:
            return json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _build(self, record: dict, key: str) -> dict:
        """Preprocess one subject and write its files; the meta JSON goes last and marks completion."""
        volume = preprocess_subject(record, self.spatial_size, self.normalization, self.allow_missing, self.spacing)
        self.builds += 1
        image_file, mask_file, meta_file = self._files(key)
        image = np.ascontiguousarray(np.moveaxis(volume["image"], -1, 0))  # (D, 4, H, W)
        mask = np.ascontiguousarray(np.moveaxis(volume["mask"], -1, 0))  # (D, H, W)
        brain = volume["brain"]
        meta = {
            "subject": str(record["subject"]), "key": key, "version": CACHE_VERSION,
            "shape": list(volume["image"].shape), "spacing": volume["spacing"], "present": volume["present"],
            "has_mask": volume["has_mask"], "grade": record.get("grade"),
            "brain_fraction": [round(float(f), 6) for f in brain.mean(axis=(0, 1))],
            "tumour_pixels": [int(n) for n in volume["mask"].sum(axis=(0, 1))],
            "sources": [_file_signature(p) for p in _source_files(record)],
            "warnings": volume.get("warnings", []),
        }
        for target, array in ((image_file, image), (mask_file, mask)):
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array)
        atomic_write_json(meta_file, meta)
        return meta

    def _arrays(self, record: dict) -> dict:
        """{'image': (D,4,H,W) memmap, 'mask': (D,H,W) memmap, 'meta'} from memory, disk, or a fresh build."""
        key = self.key(record)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        meta = self._checked(self._read_meta(key) or self._build(record, key), record)
        image_file, mask_file, _ = self._files(key)
        try:
            # Copy-on-write maps: writable for torch, and a stray in-place edit never reaches the file.
            entry = {"image": np.load(image_file, mmap_mode="c"), "mask": np.load(mask_file, mmap_mode="c"), "meta": meta}
        except (OSError, ValueError) as err:  # a damaged cache file: rebuild it rather than fail
            logger.warning("cache file for %s unreadable (%s): rebuilding", record["subject"], err)
            meta = self._build(record, key)
            entry = {"image": np.load(image_file, mmap_mode="c"), "mask": np.load(mask_file, mmap_mode="c"), "meta": meta}
        self.disk_loads += 1
        self._memory[key] = entry
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return entry

    def get(self, record: dict) -> dict:
        """image float32 (4,H,W,D), mask uint8 (1,H,W,D), brain bool (D,), brain_fraction (D,),
        tumour_pixels (D,), spacing (3,), subject, present, has_mask. Tensors are views of the cache."""
        entry = self._arrays(record)
        meta = entry["meta"]
        brain_fraction = torch.tensor(meta["brain_fraction"], dtype=torch.float32)
        return {
            "image": torch.from_numpy(entry["image"]).permute(1, 2, 3, 0),
            "mask": torch.from_numpy(entry["mask"]).permute(1, 2, 0).unsqueeze(0),
            "brain": brain_fraction > 0,
            "brain_fraction": brain_fraction,
            "tumour_pixels": torch.tensor(meta["tumour_pixels"], dtype=torch.int64),
            "spacing": torch.tensor(meta["spacing"], dtype=torch.float64),
            "subject": meta["subject"],
            "present": list(meta["present"]),
            "has_mask": bool(meta["has_mask"]),
        }

    def get_slice(self, record: dict, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of axial slice z: image (4, H, W) float32 and mask (H, W) uint8 (one contiguous read each)."""
        entry = self._arrays(record)
        return np.array(entry["image"][z]), np.array(entry["mask"][z])
