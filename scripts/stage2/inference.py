"""Stage-2 masks of volumes: the segmentation network over axial slices, and its inference step.

`stage2_probability` is the one route from a preprocessed volume to the stage-2 tumour
probability (MONAI SliceInferer over whole axial slices, softmax): the report
(scripts.stage2.report) and inference both call it.

Inference (`configs/stage2_inference.yaml`, merged over configs/inference.yaml) reuses the
CAM inference's inputs, preprocessing and inverse: `Stage2Evaluator` is a MONAI Evaluator whose
iteration turns each preprocessed subject into the stage-2 probability and mask, then Invertd
(the same preprocessing Compose) and `SaveStage2Maskd` write

    <output_dir>/<subject>/<subject>_stage2_mask.nii.gz   uint8, probability > stage2_threshold
    <output_dir>/<subject>/<subject>_stage2_prob.nii.gz   float32 tumour probability

beside the CAM outputs, on the input's exact grid (scripts.workflows.inference.write_nifti, atomic).

`serve: both` runs `CAMAndStage2Evaluator`: one pass over the subjects, each loaded and
preprocessed once, both models on it, then the CAM postprocessing and the stage-2 one.
`run_selected` picks the engine from `serve`.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.inferers import SliceInferer
from monai.transforms import Transform
from monai.utils import convert_to_tensor

from scripts.common import canonical_modalities
from scripts.data.sanity import mask_warning
from scripts.data.subjects import DataError
from scripts.workflows.output_files import OutputManifest, file_name
from scripts.precision import autocast, resolve_precision
from scripts.runtime import as_flag
from scripts.workflows.options import UNIT_INTERVAL, check_unit_interval

MANIFEST_PREFIX = "stage2:"  # the stage-2 files' own manifest entry: a CAM rerun never deletes them


def stage2_probability(net: torch.nn.Module, image: torch.Tensor, slice_batch_size: int = 32,
                       precision: str | None = None) -> torch.Tensor:
    """(K, H, W, D) preprocessed volume -> (H, W, D) float32 tumour probability on the CPU."""
    device = next(net.parameters()).device
    x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(device, dtype=torch.float32)
    inferer = SliceInferer(roi_size=tuple(x.shape[2:4]), spatial_dim=2, sw_batch_size=int(slice_batch_size))
    net.eval()
    with torch.no_grad(), autocast(device, resolve_precision(precision, device)):
        logits = inferer(x, net)
    logits = torch.as_tensor(logits).as_subclass(torch.Tensor).float()
    return torch.softmax(logits, dim=1)[0, 1].cpu()


class Stage2Evaluator(Evaluator):
    """MONAI Evaluator: subjects -> stage-2 tumour probability and mask, then `postprocessing`.

    Batches are lists of subject dicts (monai.data.utils.no_collation) with "image" (K, H, W, D)
    after the preprocessing and "modalities" (the channels' names). The output of a subject is
    {"stage2_prob": (1, H, W, D), "stage2_mask": (1, H, W, D)} as MetaTensors (Invertd inverts
    MetaTensors only).

    Args:
        device: where the network runs.
        val_data_loader: subjects (inference.yaml's dataloader).
        network: the Stage2Net (scripts.stage2.model).
        threshold: mask = probability > threshold.
        slice_batch_size: slices per forward.
        precision: auto | bf16 | fp16 | fp32 autocast (scripts.precision); None = fp32.
        postprocessing: transform run on each subject's output (Invertd, SaveStage2Maskd).
        val_handlers: MONAI / ignite handlers to attach (e.g. the CheckpointLoader).
    """

    def __init__(self, device, val_data_loader, network, threshold: float = 0.5, slice_batch_size: int = 32,
                 precision: str | None = None, postprocessing=None, val_handlers=None):
        super().__init__(device=device, val_data_loader=val_data_loader, postprocessing=postprocessing,
                         val_handlers=val_handlers, decollate=False)
        self.network = network
        self.threshold = check_unit_interval("stage2_threshold", threshold, UNIT_INTERVAL["stage2_threshold"])
        self.slice_batch_size = int(slice_batch_size)
        self.precision = precision

    def network_input(self, item: dict) -> torch.Tensor:
        """The subject's channels in the network's order; a DataError when one is missing."""
        wanted = list(self.network.modalities)
        present = canonical_modalities(item.get("modalities") or wanted)
        missing = [m for m in wanted if m not in present]
        if missing:
            raise DataError(f"subject {item.get('subject')}: the stage-2 network takes {wanted} together but "
                            f"{missing} has no input file. Fix: add the missing modality file(s), or serve the CAM "
                            f"model (configs/inference.yaml alone), which runs on the modalities present.")
        return convert_to_tensor(item["image"], track_meta=False)[[present.index(m) for m in wanted]]

    def predict(self, image: torch.Tensor, subject=None) -> dict:
        """{"stage2_prob", "stage2_mask"} of a (K, H, W, D) input from `network_input`; a mask over
        much of the brain or outside it is a warning with the numbers (as the CAM mask's).

        Args:
            image: the subject's channels in the network's order.
            subject: the subject id, for the warning.
        """
        probability = stage2_probability(self.network, image, self.slice_batch_size, self.precision)
        mask_warning(probability > self.threshold, (image != 0).any(dim=0), str(subject), what="stage-2 mask")
        return {"stage2_prob": MetaTensor(probability[None]),
                "stage2_mask": MetaTensor((probability > self.threshold)[None].to(torch.float32))}

    def subject_output(self, item: dict) -> dict:
        return self.predict(self.network_input(item), item.get("subject"))

    def _iteration(self, engine: Engine, batchdata) -> list[dict]:
        items = batchdata if isinstance(batchdata, list) else decollate_batch(batchdata)
        engine.state.batch = items
        engine.state.output = [self.subject_output(item) for item in items]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs the postprocessing
        return engine.state.output


class SaveStage2Maskd(Transform):
    """Write a subject's stage-2 mask and probability into `output_dir/<subject>/` on the input grid.

    Files are listed in the folder's manifest under their own entry, so the CAM outputs and the
    stage-2 outputs of one subject are replaced independently and no user file is deleted.

    Args:
        output_dir: folder of the subject folders (inference.yaml's `output_dir`).
        write_probability: also write `<subject>_stage2_prob.nii.gz`.
        prob_key: key of the probability (1, X, Y, Z).
        mask_key: key of the mask (1, X, Y, Z).
        checkpoint: the stage-2 checkpoint; the manifest records its hash per subject.
    """

    def __init__(self, output_dir, write_probability: bool = True, prob_key: str = "stage2_prob",
                 mask_key: str = "stage2_mask", checkpoint=None):
        self.output_dir = Path(output_dir)
        self.write_probability = as_flag(write_probability, "stage2_write_probability")
        self.prob_key, self.mask_key = prob_key, mask_key
        self.manifest = OutputManifest(self.output_dir, checkpoint)

    def __call__(self, data: dict) -> dict:
        from scripts.workflows.inference import write_nifti  # the inference writing path (atomic, input affine)

        subject = file_name(data["subject"])
        shape, affine = tuple(data["input_shape"]), np.asarray(data["input_affine"])
        probability, mask = data[self.prob_key], data[self.mask_key]
        if tuple(mask.shape[1:]) != shape:
            raise RuntimeError(f"subject {subject}: the stage-2 mask {tuple(mask.shape[1:])} is not on the input grid "
                               f"{shape} (Invertd missing from the postprocessing?)")
        folder = self.output_dir / subject
        targets = ([folder / f"{subject}_stage2_prob.nii.gz"] if self.write_probability else []) + [
            folder / f"{subject}_stage2_mask.nii.gz"]
        self.manifest.check_ours(data["subject"], targets)  # a user's own file of that name is never replaced
        saved = []
        if self.write_probability:
            saved.append(write_nifti(targets[0], probability[0], affine, np.float32))
        saved.append(write_nifti(targets[-1], mask[0] > 0.5, affine, np.uint8))
        self.manifest.replace(MANIFEST_PREFIX + str(data["subject"]), saved, subject_id=str(data["subject"]))
        data["stage2_saved"] = [str(p) for p in saved]
        print(f"[stage2] {data['subject']}: mask -> {saved[-1]}", flush=True)
        return data


class CAMAndStage2Evaluator(Evaluator):
    """MONAI Evaluator for `serve: both`: each subject is loaded and preprocessed once, then both
    models run on it and one `postprocessing` writes both sets of outputs.

    The per-subject steps are those of the two single-model evaluators (`cam.subject_maps`,
    `stage2.network_input` / `stage2.predict`), so the outputs equal those of `serve: cam` and
    `serve: stage2`. Hand-written because MONAI's EnsembleEvaluator runs `inferer(inputs, network)`
    on one collated batch per network, whereas the CAM maps come from the map engine (per-modality
    networks, gating, missing modalities skipped) and the stage-2 network takes its own channel
    order; only the iteration is custom, the loop, handlers and postprocessing are MONAI's.
    The output of a subject holds the CAM evaluator's keys and the stage-2 ones
    ("stage2_prob", "stage2_mask").

    Args:
        device: where the networks run.
        val_data_loader: subjects (inference.yaml's dataloader).
        cam: the CAMMapEvaluator (inference.yaml's `evaluator`): its network and map engine.
        stage2: the Stage2Evaluator: its network, threshold and precision.
        postprocessing: transform run on each subject's merged output (both Invertd + writers).
        val_handlers: MONAI / ignite handlers to attach (both CheckpointLoaders, the progress lines).
    """

    def __init__(self, device, val_data_loader, cam, stage2, postprocessing=None, val_handlers=None):
        super().__init__(device=device, val_data_loader=val_data_loader, postprocessing=postprocessing,
                         val_handlers=val_handlers, decollate=False)
        self.cam, self.stage2 = cam, stage2

    def subject_output(self, item: dict) -> dict:
        image = self.stage2.network_input(item)  # a missing modality stops the run before either model runs
        return {**self.cam.subject_maps(item), **self.stage2.predict(image, item.get("subject"))}

    def _iteration(self, engine: Engine, batchdata) -> list[dict]:
        items = batchdata if isinstance(batchdata, list) else decollate_batch(batchdata)
        self.cam.network.eval()  # as CAMMapEvaluator's iteration (stage2_probability sets its own)
        engine.state.batch = items
        engine.state.output = [self.subject_output(item) for item in items]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs the postprocessing
        return engine.state.output


def run_selected(serve: str, cam=None, stage2=None, both=None, cam_checkpoint=None, stage2_checkpoint=None) -> list[str]:
    """Run the inference `serve` names: "cam", "stage2" or "both".

    Every checkpoint the choice needs is checked before anything runs. With "both", `both` (one
    pass over the subjects) runs when given, else `cam` then `stage2`.

    Args:
        serve: which model's outputs to write.
        cam: a callable running the CAM inference (e.g. inference.yaml's run step).
        stage2: a callable running the stage-2 inference.
        both: a callable running both models in one pass (CAMAndStage2Evaluator).
        cam_checkpoint: the CAM checkpoint (must exist when the CAM model is served).
        stage2_checkpoint: the stage-2 checkpoint (must exist when stage 2 is served).
    """
    from scripts.runtime import BundleError, MissingCheckpoint

    if serve not in SERVE_CHOICES:
        raise BundleError(f"--serve must be one of {list(SERVE_CHOICES)}, got {serve!r}.")
    models = [name for name in ("cam", "stage2") if serve in (name, "both")]
    for name, checkpoint in (("cam", cam_checkpoint), ("stage2", stage2_checkpoint)):
        if name in models and checkpoint is not None and not Path(checkpoint).is_file():
            raise MissingCheckpoint(f"no {name} checkpoint at {checkpoint}. Fix: train it first, pass its path "
                                    f"(--ckpt_path / --stage2_ckpt_path), or choose --serve "
                                    f"{'stage2' if name == 'cam' else 'cam'}.")
    if serve == "both" and both is not None:
        both()
        return models
    for name in models:
        {"cam": cam, "stage2": stage2}[name]()
    return models


SERVE_CHOICES = ("cam", "stage2", "both")
