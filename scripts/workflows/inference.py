"""Inference: per-modality tumour CAMs, the fused map and the whole-tumour mask of new subjects.

The pipeline of `configs/inference.yaml` (MONAI pieces in brackets):

    find_inputs        subject records: a folder in any supported layout
                       (scripts.data.subjects.discover_subjects) or files named on the command line
    loading            LoadSubjectd: the present modalities' files -> "image" (every incoming key kept)
    preprocessing      [Orientationd] RAS -> [Spacingd] -> [NormalizeIntensityd] nonzero,
                       channel-wise -> [ResizeWithPadOrCropd] in-plane: training's preprocessing
    CAMMapEvaluator    an [Evaluator]; one iteration = one subject: the networks of the present
                       modalities over the axial slices ([SliceInferer]; CAM or GradCAM++,
                       gating and TTA from scripts.model.cams), empty maps on slices without brain,
                       fusion and threshold
    postprocessing     [Invertd] back to the input's grid
    saving             SaveSubjectMapsd ([NibabelWriter], written atomically with the input's affine)

Consumers of the bundle (MONAI Deploy, MONAI Label, `monai.bundle.load`) run
configs/inference_deploy.yaml instead: MONAI transforms around the scripted
`scripts.model.whole_tumour.WholeTumourCAM`, the same fused map and mask without this module.
    SubjectProgress    one line per subject with the seconds it took

`CAMMapEvaluator` and `SubjectProgress` are shared with the evaluation workflow
(`scripts.workflows.evaluate`), which feeds cached test volumes instead of files.
"""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, NibabelWriter, decollate_batch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils import convert_to_tensor

from scripts.common import MODALITIES, atomic_path, canonical_modalities, canonical_modality
from scripts.data.subjects import DataError, discover_subjects
from scripts.data.volumes import check_same_grid, load_volume
from scripts.workflows.output_files import OutputManifest, check_distinct_names, file_name
from scripts.runtime import BundleError, MissingCheckpoint
from scripts.data.sanity import mask_warning, volume_warnings
from scripts.workflows.map_engine import MapEngine
from scripts.precision import resolve_precision, to_memory_format
from scripts.model.cams import DEFAULT_FUSION, DEFAULT_GATE_SOURCE

FUSED = "fused"
TRAIN_HINT = "python -m monai.bundle run training --config_file configs/train.yaml"

# ---------------------------------------------------------------------------------------
# Inputs


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def subject_from_files(paths: Sequence[str]) -> str:
    """Subject id implied by file names: 'BraTS19_X' for 'BraTS19_X_t1.nii.gz' (else the stem)."""
    stem = _strip_image_suffix(Path(paths[0]).name)
    match = re.match(r"^(?P<prefix>.+)[_-](?P<token>[^_-]+)$", stem)
    if match:
        try:
            canonical_modality(match["token"])
            return match["prefix"]
        except ValueError:
            pass
    return stem


def record_from_files(files, subject: str | None = None) -> dict:
    """One subject record from {modality: path} (a dict, or its Python-literal string)."""
    example = "--files \"{'t1': 'a_t1.nii.gz', 'flair': 'a_flair.nii.gz'}\""
    if isinstance(files, str):
        try:
            files = ast.literal_eval(files)
        except (ValueError, SyntaxError) as err:
            raise DataError(f"files {files!r} is not a {{modality: path}} mapping. Fix: e.g. {example}") from err
    if not isinstance(files, Mapping) or not files:
        raise DataError(f"files must be a non-empty {{modality: path}} mapping, got {files!r}. Fix: e.g. {example}")
    try:
        images = {canonical_modality(str(m)): os.path.abspath(os.path.expanduser(str(p))) for m, p in files.items()}
    except ValueError as err:
        raise DataError(f"files {dict(files)}: {err}. Fix: name each file by its modality, e.g. {example}") from err
    return {"subject": str(subject or subject_from_files(list(images.values()))), "grade": None,
            "images": images, "seg": None, "layout": "files"}


def find_inputs(dataset_dir=None, files=None, subject: str | None = None) -> list[dict]:
    """Subject records to run: `files` ({modality: path}) when given, else every subject found
    under `dataset_dir` (one subject's folder, a dataset folder in any supported layout, or a
    datalist JSON); `subject` then keeps that one subject only."""
    if files:
        records = [record_from_files(files, subject)]
        file_name(records[0]["subject"])  # refuses ids such as '..' before anything runs
        return records
    if dataset_dir is None:
        raise DataError("no input: pass --dataset_dir DIR (a subject folder or a dataset) or --files \"{...}\".")
    records = discover_subjects(dataset_dir, allow_missing=True)
    if subject:
        kept = [r for r in records if r["subject"] == str(subject)]
        if not kept:
            raise DataError(f"subject {subject} not found under {dataset_dir} (found {[r['subject'] for r in records][:10]}). "
                            f"Fix: pass one of those names, or leave --subject out to run them all.")
        records = kept
    check_distinct_names(r["subject"] for r in records)  # every output name valid and distinct, up front
    return records


def input_subjects(dataset_dir=None, files=None, subject: str | None = None) -> list[str]:
    """The subject ids a run writes (`find_inputs`'s records), for `claim_output_dir`.

    Args:
        dataset_dir: as `find_inputs`.
        files: as `find_inputs`.
        subject: as `find_inputs`.
    """
    return [str(r["subject"]) for r in find_inputs(dataset_dir, files, subject)]


# ---------------------------------------------------------------------------------------
# Loading (the first transform of the preprocessing)


def _load_modalities(record: dict, wanted: Sequence[str]) -> tuple[dict, dict]:
    """{modality: (1, X, Y, Z) MetaTensor} of the wanted modalities the record has, and their files."""
    subject = str(record["subject"])
    if "image4d" in record:
        path, channels = record["image4d"], canonical_modalities(record["channels"])
        volume = load_volume(path, subject, "4D image")
        if volume.shape[0] != len(channels):
            raise DataError(f"subject {subject}: 4D image {path} has {volume.shape[0]} channels but {len(channels)} "
                            f"names {channels}. Fix: give one channel name per volume, in file order.")
        return ({m: volume[i:i + 1] for i, m in enumerate(channels) if m in wanted},
                {m: path for m in channels if m in wanted})
    files = {canonical_modality(m): p for m, p in record["images"].items()}
    files = {m: files[m] for m in wanted if m in files}
    loaded = {}
    for modality, path in files.items():
        loaded[modality] = load_volume(path, subject, modality)
        if loaded[modality].shape[0] != 1:
            raise DataError(f"subject {subject}: {modality} file {path} holds {loaded[modality].shape[0]} volumes; "
                            f"one 3D volume per modality file was expected. Fix: split it, or list it as a 4D image.")
    return loaded, files


class LoadSubjectd(Transform):
    """Subject record -> {"image": (K, X, Y, Z) MetaTensor of the present modalities, ...}.

    Every key of the incoming record is kept. Only the networks' modalities are loaded; the
    others are listed under "missing". The
    input grid is kept under "input_shape" / "input_affine" so the outputs can be written
    on exactly that grid. MONAI's LoadImaged loads a fixed set of keys and fails on a
    missing one, and the error must name the subject; hence this small transform around
    LoadImage.

    Args:
        modalities: the networks' modalities (loaded when present, in this order).
        image_key: output key of the stacked volume.
    """

    def __init__(self, modalities: Sequence[str] = MODALITIES, image_key: str = "image"):
        self.modalities = canonical_modalities(modalities)
        self.image_key = image_key

    def as_record(self, record: dict) -> dict:
        """Accept MONAI-Label-style {"image": 4D path or {modality: path}} besides subject records;
        a 4D image's channels default to the networks' modalities, in order."""
        if "images" in record or "image4d" in record or "image" not in record:
            return record
        image = record["image"]
        if isinstance(image, Mapping):
            return {**record_from_files(dict(image), record.get("subject")), **{"seg": record.get("seg")}}
        return {"subject": str(record.get("subject") or subject_from_files([str(image)])), "image4d": str(image),
                "channels": list(record.get("channels") or self.modalities), "seg": record.get("seg")}

    def __call__(self, incoming: dict) -> dict:
        record = self.as_record(incoming)
        subject = str(record["subject"])
        volumes, files = _load_modalities(record, self.modalities)
        if not volumes:
            found = sorted(record.get("images", {})) or record.get("channels")
            raise DataError(f"subject {subject}: none of the networks' modalities {self.modalities} has an input "
                            f"(found {found}). Fix: add at least one of them, or run a model trained on these.")
        check_same_grid(volumes, files, subject)
        volume_warnings(volumes, files, subject)  # constant, no foreground / no background, oblique
        present = [m for m in self.modalities if m in volumes]
        first = volumes[present[0]]
        image = torch.cat([volumes[m] for m in present], dim=0)  # MetaTensor: keeps the first's meta
        return {
            **incoming,  # a caller's keys (e.g. MONAI Label's request options) travel on
            self.image_key: image,
            "subject": subject,
            "modalities": present,
            "present": present,
            "missing": [m for m in self.modalities if m not in volumes],
            "files": {m: str(files[m]) for m in present},
            "input_shape": tuple(int(s) for s in first.shape[1:]),
            "input_affine": np.asarray(first.affine, dtype=np.float64),
        }


# ---------------------------------------------------------------------------------------
# Maps of one subject


class CAMMapEvaluator(Evaluator):
    """MONAI Evaluator whose iteration turns subjects into tumour maps and masks.

    Batches are lists of subject dicts (`monai.data.utils.no_collation`), each with "image"
    (K, H, W, D), optionally "modalities" (the channels' names; default the network's) and
    "brain" (D,). The output of a subject is {"pred": (M+1, H, W, D) maps of the M networks
    that had an input then the fused map, "mask": (1, H, W, D) fused > threshold,
    "map_names", "modalities_used", "modalities_missing"}. `postprocessing` (e.g. Invertd +
    SaveSubjectMapsd) runs on every subject, MONAI's way. The maps come from the map engine
    (`scripts.workflows.map_engine.MapEngine`), the same as validation's.

    Args:
        device: where the networks run.
        val_data_loader: subjects (lists of dicts, see above).
        network: a MultiModalCAM (its per-modality `nets` run, so missing modalities are skipped).
        inferer: the slice inferer (MONAI SliceInferer); default one over whole slices.
        method: "cam", "gradcampp" or "softmax".
        gate: empty maps on slices a network classifies as healthy.
        gate_threshold: tumour probability a slice must exceed to keep its map.
        tta: None, "flips" or "flips_rot90".
        fusion: "max" or "mean" over the modalities.
        threshold: binarisation threshold (mask = fused > threshold).
        slice_batch_size: slices per forward.
        postprocessing: transform run on each subject's output (Invertd, SaveSubjectMapsd).
        val_handlers: MONAI / ignite handlers to attach.
        epoch_length: iterations per run (default: the loader's length).
        precision: auto | bf16 | fp16 | fp32 autocast (scripts.precision); None = fp32.
        channels_last: store the networks' weights NHWC.
        slice_normalization: per-slice normalisation the networks were trained with; None =
            the network's recorded setting ("none" when it records none).
        gate_source: whose slice probability opens a network's gate: "own" or "mean" (MapEngine).
    """

    def __init__(self, device, val_data_loader, network, inferer: Inferer | None = None, method: str = "cam",
                 gate: bool = True, gate_threshold: float = 0.5, tta: str | None = None, fusion: str = DEFAULT_FUSION,
                 threshold: float = 0.5, slice_batch_size: int = 32, postprocessing=None, val_handlers=None,
                 epoch_length: int | None = None, precision: str | None = None, channels_last: bool = False,
                 slice_normalization: str | None = None, gate_source: str = DEFAULT_GATE_SOURCE):
        settings = getattr(network, "settings", None)
        if slice_normalization is None and settings is not None:
            slice_normalization = settings.slice_normalization
        self.engine = MapEngine(method=method, gate=gate, gate_threshold=gate_threshold, fusion=fusion,
                                threshold=threshold, tta=tta, slice_batch_size=slice_batch_size,
                                precision=resolve_precision(precision, device),
                                slice_normalization=slice_normalization, inferer=inferer, gate_source=gate_source)
        super().__init__(device=device, val_data_loader=val_data_loader, epoch_length=epoch_length,
                         postprocessing=postprocessing, val_handlers=val_handlers, decollate=False)
        self.network = to_memory_format(network, channels_last)

    def subject_maps(self, item: dict) -> dict:
        """Maps, fused map and mask of one subject (see the class docstring)."""
        image = convert_to_tensor(item["image"], track_meta=False)
        channels = list(item.get("modalities") or self.network.modalities)
        if not any(m in channels for m in self.network.modalities):
            raise DataError(f"subject {item.get('subject')}: channels {channels} include none of the network's "
                            f"modalities {list(self.network.modalities)}. Fix: give inputs for these modalities.")
        # "present": the modalities with an input file (LoadSubjectd; VolumeDataset from the cache, where a
        # missing one is zero-filled): the map engine's one rule skips the others' networks in both workflows.
        result = self.engine(self.network, image, channels=channels, brain=item.get("brain"), present=item.get("present"))
        # Far from the training data (noise, another contrast) shows as a huge mask: say so.
        mask_warning(result.mask, (image != 0).any(dim=0), str(item.get("subject")))
        # MetaTensors: Invertd only inverts MetaTensors (it copies the image's transform trace).
        return {
            "pred": MetaTensor(torch.cat([result.maps, result.fused[None]], dim=0)),
            "mask": MetaTensor(result.mask[None].to(torch.float32)),
            "map_names": result.names + [FUSED],
            "modalities_used": result.names,
            "modalities_missing": [m for m in self.network.modalities if m not in result.names],
        }

    def _iteration(self, engine: Engine, batchdata) -> list[dict]:
        items = batchdata if isinstance(batchdata, list) else decollate_batch(batchdata)
        self.network.eval()
        engine.state.batch = items
        engine.state.output = [self.subject_maps(item) for item in items]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs the postprocessing
        return engine.state.output


# ---------------------------------------------------------------------------------------
# Outputs


def safe_name(subject: str) -> str:
    """A subject id as a folder / file name (scripts.workflows.output_files.file_name: reversible, no '..')."""
    return file_name(subject)


def write_nifti(target, volume, affine: np.ndarray, dtype=np.float32) -> Path:
    """Write an (X, Y, Z) volume with `affine` through MONAI's NibabelWriter, atomically.

    The maps are already on the input grid, so the writer's resampling step (set_metadata) is
    skipped: in MONAI 1.6.1 SaveImage / NibabelWriter.set_metadata resample a 3D array with a
    2D affine and fail on permuted-axis affines (e.g. sagittal acquisitions).
    """
    target = Path(target)
    writer = NibabelWriter(output_dtype=dtype)
    volume = convert_to_tensor(volume, track_meta=False)
    writer.set_data_array(volume, channel_dim=None)
    # set_data_array squeezes trailing singleton axes: a single-slice (X, Y, 1) input came back (X, Y)
    writer.data_obj = writer.data_obj.reshape(tuple(volume.shape))
    writer.affine = np.asarray(affine, dtype=np.float64)
    with atomic_path(target) as tmp:
        writer.write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    return target


class SaveSubjectMapsd(Transform):
    """Write a subject's maps and mask into `output_dir/<subject>/` on the input's grid.

    Files: `<subject>_cam_<modality>.nii.gz` per network that ran, `<subject>_cam_fused.nii.gz`
    (float32) and `<subject>_mask.nii.gz` (uint8), each written atomically; the mask goes
    last, so its presence marks a complete subject. `<subject>` is the id as a file name
    (scripts.workflows.output_files.file_name). Every file written is listed in the folder's manifest;
    maps an earlier run listed there for modalities that did not run now are removed, and no
    other file is ever deleted. The maps must already be on the input grid (Invertd before
    this); the input's own affine is written, so the geometry is exact.

    Args:
        output_dir: folder of the subject folders.
        pred_key: key of the maps (M+1, X, Y, Z).
        mask_key: key of the mask (1, X, Y, Z).
        checkpoint: the checkpoint that made the maps; the manifest records its hash per subject.
    """

    def __init__(self, output_dir, pred_key: str = "pred", mask_key: str = "mask", checkpoint=None):
        self.output_dir = Path(output_dir)
        self.pred_key, self.mask_key = pred_key, mask_key
        self.manifest = OutputManifest(self.output_dir, checkpoint)

    def __call__(self, data: dict) -> dict:
        subject = safe_name(data["subject"])
        shape, affine = tuple(data["input_shape"]), np.asarray(data["input_affine"])
        pred, mask = data[self.pred_key], data[self.mask_key]
        if tuple(pred.shape[1:]) != shape or tuple(mask.shape[1:]) != shape:
            raise RuntimeError(f"subject {subject}: maps {tuple(pred.shape[1:])} are not on the input grid {shape}; "
                               f"the preprocessing was not inverted (Invertd missing from postprocessing?)")
        folder = self.output_dir / subject
        targets = [folder / f"{subject}_cam_{name}.nii.gz" for name in data["map_names"]] + [folder / f"{subject}_mask.nii.gz"]
        self.manifest.check_ours(data["subject"], targets)  # a user's own file of that name is never replaced
        saved = [write_nifti(target, pred[i], affine, np.float32) for i, target in enumerate(targets[:-1])]
        saved.append(write_nifti(targets[-1], mask[0] > 0.5, affine, np.uint8))
        # An earlier run's map of another modality would not match this mask; only files the
        # manifest lists as written by this bundle are removed.
        self.manifest.replace(data["subject"], saved)
        data["saved"] = [str(p) for p in saved]
        return data


# ---------------------------------------------------------------------------------------
# Progress, checks and running


class SubjectProgress:
    """Print one line per subject: which networks ran, where the outputs went, seconds taken.

    Args:
        label: the line prefix (inference, evaluate).
    """

    def __init__(self, label: str = "inference"):
        self.label = label
        self.seconds: list[float] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._tick)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._report)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _reset(self, engine: Engine) -> None:
        self.seconds = []

    def _tick(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _report(self, engine: Engine) -> None:
        items, outputs = engine.state.batch, engine.state.output
        per_volume = (time.perf_counter() - self._start) / max(1, len(outputs))
        total = engine.state.epoch_length or "?"
        for item, out in zip(items, outputs):
            self.seconds.append(per_volume)
            missing = out.get("modalities_missing") or []
            note = f" (no input for {', '.join(missing)})" if missing else ""
            saved = out.get("saved")
            where = f" -> {Path(saved[0]).parent}" if saved else ""
            print(f"[{self.label} {len(self.seconds)}/{total}] {item.get('subject')}: networks "
                  f"{', '.join(out['modalities_used'])}{note}{where} ({per_volume:.2f} s/volume)", flush=True)

    def _summary(self, engine: Engine) -> None:
        if self.seconds:
            print(f"[{self.label}] {len(self.seconds)} volume(s), {np.mean(self.seconds):.2f} s/volume on average",
                  flush=True)


def require_checkpoint(path) -> str:
    """The checkpoint path, or a FileNotFoundError that says how to get one; a file torch cannot
    read is an `UnreadableCheckpoint` (one line naming it and the fix)."""
    if not Path(path).is_file():
        raise MissingCheckpoint(f"no checkpoint at {path}. Fix: train first ({TRAIN_HINT}) or pass --ckpt_path PATH "
                                f"(a state dict of scripts.model.networks.MultiModalCAM).")
    from scripts.model.networks import read_checkpoint

    read_checkpoint(path)
    return str(path)


def _cause_of_type(err: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_engine(engine: Engine) -> Engine:
    """Run an engine; a data error raised inside MONAI's transform wrappers is re-raised as
    itself (its message names subject, file and fix) instead of three wrapping tracebacks."""
    try:
        engine.run()
    except Exception as err:
        data_error = _cause_of_type(err, (DataError, BundleError))
        if data_error is not None:
            raise data_error from data_error.__cause__
        if "state_dict" in str(err):  # one line instead of one per mismatched tensor
            first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line or "Missing" in line),
                         str(err).splitlines()[0])
            raise BundleError(f"the checkpoint does not fit the network ({first[:200]}). Fix: the checkpoint was "
                              f"trained with other network settings; pass the training values of --modalities, "
                              f"--backbone and --base_channels.") from err
        raise
    return engine
