"""Ignite/MONAI handlers the method adds, reusable from configs.

- `AtomicCheckpointSaver`: MONAI's CheckpointSaver writes with `atomic=False` and, with a
  fixed filename, deletes the old file before writing the new one; a kill in between
  loses the checkpoint. This subclass keeps MONAI's logic and swaps in a saver that
  writes a temporary file and renames it over the old one.
- `ResumeFromCheckpoint`: MONAI's CheckpointLoader, skipped when no checkpoint exists yet,
  so the same config starts fresh or resumes.
- `LambdaEScheduler`: sets lambda_E(t) on the trainer at the start of every epoch.
- `ValidationReport`: prints the best validation table at the end of training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from .common import MODALITIES, atomic_path, atomic_write_text
from .losses import lambda_e
from .runtime import BundleError


class CheckpointError(BundleError):
    """A checkpoint that cannot be resumed from; the message names the file and the fix."""


class _AtomicDiskSaver(DiskSaver):
    """Ignite DiskSaver with an optional fixed filename and atomic replacement."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename, metadata=None) -> None:
        super().__call__(checkpoint=checkpoint, filename=self.filename or filename, metadata=metadata)

    def _save_func(self, checkpoint, path, func) -> None:
        # ignite closes (flushes) its temp file outside its try block, so a full disk left the
        # temp file behind; atomic_path removes it on any failure and sets mode 0644.
        with atomic_path(path) as tmp:
            func(checkpoint, tmp, **self.kwargs)

    def remove(self, filename: str) -> None:
        # With a fixed name the new file atomically replaces the old one: removing it first
        # (ignite's order) would leave a window with no checkpoint at all.
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI CheckpointSaver whose files are written atomically.

    `interval_filename` gives the interval checkpoint a fixed name (e.g. "last.pt") so a
    killed run can be resumed from a known path.

    Args:
        save_dir: folder of the checkpoint files.
        save_dict: name -> object with state_dict (one entry: the file is that state dict).
        interval_filename: fixed name of the interval checkpoint (None: MONAI's names).
        kwargs: MONAI CheckpointSaver options (save_interval, save_key_metric, key_metric_filename, ...).
    """

    def __init__(self, save_dir: str, save_dict: dict, interval_filename: str | None = None, **kwargs):
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        fixed_names = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": interval_filename,
        }
        for attribute, filename in fixed_names.items():
            checkpoint = getattr(self, attribute, None)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(save_dir, filename)
        if interval_filename is not None and self._interval_checkpoint is not None:
            self._interval_checkpoint.n_saved = 1

    def state_dict(self) -> dict:
        """The best-metric tracking list, so a resumed run keeps the true best model."""
        checkpoint = self._key_metric_checkpoint
        return checkpoint.state_dict() if checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


class RunSettings:
    """Settings a checkpoint can only be resumed with (network shape), saved inside it.

    Listed first in the checkpoint objects, so a resume with other settings stops with one
    line naming the differing keys instead of a state-dict size mismatch per tensor.

    Args:
        settings: name -> value, e.g. modalities, backbone, base_channels.
    """

    def __init__(self, **settings):
        self.settings = {k: _plain(v) for k, v in settings.items()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def differences(self, stored: dict) -> list[str]:
        return [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in self.settings.items() if k in stored and stored[k] != v]

    def load_state_dict(self, state: dict) -> None:
        if self.differences(state):
            raise CheckpointError(f"the checkpoint was written with other settings ({'; '.join(self.differences(state))}).")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


class ResumeFromCheckpoint(CheckpointLoader):
    """Resume from `load_path` when it exists; start fresh (and say so) when it does not.

    A file that cannot be read, or that was written with other network settings, stops the
    run before epoch 1 with one line naming the file, the differing keys and the fix; other
    files (e.g. models/model.pt) are never touched.

    Args:
        load_path: the checkpoint to resume from (e.g. models/last.pt).
        load_dict: name -> object to restore (the checkpoint objects of train.yaml).
        enabled: False skips resuming.
        kwargs: MONAI CheckpointLoader options (map_location, strict, ...).
    """

    def __init__(self, load_path: str, load_dict: dict, enabled: bool = True, **kwargs):
        super().__init__(load_path=str(load_path), load_dict=load_dict, **kwargs)
        self.enabled = enabled

    def _fix(self) -> str:
        return (f"Fix: delete it or use another --ckpt_dir (to resume, pass the settings of the run that wrote it); "
                f"{Path(self.load_path).parent / 'model.pt'} is not touched.")

    def _read(self) -> dict:
        import torch

        try:
            checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # zip errors, EOFError, unpickling errors, ...
            first = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(f"checkpoint {self.load_path} is unreadable ({type(err).__name__}: {first}); it is "
                                  f"truncated or corrupt (a full disk, or a copy cut short). {self._fix()}") from err
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"checkpoint {self.load_path} holds a {type(checkpoint).__name__}, not a training "
                                  f"checkpoint. {self._fix()}")
        return checkpoint

    def _check_compatible(self, checkpoint: dict) -> None:
        import torch

        problems = []
        for key, obj in self.load_dict.items():
            if key not in checkpoint:
                continue
            if isinstance(obj, RunSettings):
                problems += obj.differences(checkpoint[key])
            elif isinstance(obj, torch.nn.Module) and not problems:
                own, stored = obj.state_dict(), checkpoint[key]
                tensors = [n for n in set(own) & set(stored) if n != "_extra_state"]  # settings: RunSettings above
                names = sorted((set(own) ^ set(stored)) - {"_extra_state"}) + sorted(
                    n for n in tensors if tuple(own[n].shape) != tuple(stored[n].shape))
                if names:
                    problems.append(f"{len(names)} tensors of {key!r} differ, e.g. {', '.join(names[:3])}")
        if problems:
            raise CheckpointError(f"checkpoint {self.load_path} was written with other network settings: "
                                  f"{'; '.join(problems)}. {self._fix()}")

    def __call__(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        if not self.enabled:
            return
        if not Path(self.load_path).is_file():
            self.logger.info(f"no checkpoint at {self.load_path}: starting a new run")
            return
        checkpoint = self._read()
        self._check_compatible(checkpoint)
        # Objects a checkpoint of an earlier version lacks (e.g. run_settings) keep their state.
        to_load = {k: v for k, v in self.load_dict.items() if k in checkpoint}
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise CheckpointError(f"checkpoint {self.load_path} is at epoch {engine.state.epoch}, past --epochs "
                                  f"{prior_max_epochs}. Fix: pass a larger --epochs to train on, or another --ckpt_dir.")
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"resumed at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class LambdaEScheduler:
    """Set `engine.lambda_e` from the configured schedule at every epoch start (1-based t).

    Args:
        schedule: paper | sigmoid | polynomial | constant (scripts.losses.lambda_e).
        rampup_epochs: T, the epoch the ramp reaches its value.
        gamma: exponent of the polynomial ramp.
        value: the weight after the ramp.
    """

    def __init__(self, schedule: str = "paper", rampup_epochs: float = 15.0, gamma: float = 2.0, value: float = 1.0):
        lambda_e(1, schedule, rampup_epochs, gamma, value)  # validate the arguments now, not mid-run
        self.schedule, self.rampup_epochs, self.gamma, self.value = schedule, rampup_epochs, gamma, value

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.lambda_e = lambda_e(engine.state.epoch, self.schedule, self.rampup_epochs, self.gamma, self.value)
        engine.logger.info(f"epoch {engine.state.epoch}: lambda_E = {engine.lambda_e:.4g}")


class ValidationReport:
    """At the end of training, print and save the table of the best validation epoch.

    Args:
        validator: the validation engine whose metrics are watched.
        output_path: where the table is written (None: printed only).
        name: logger name.
    """

    def __init__(self, validator, output_path: str | None = None, name: str | None = None):
        self.validator = validator
        self.output_path = output_path
        self.logger = logging.getLogger(name or __name__)
        self.best: dict | None = None

    def attach(self, engine: Engine) -> None:
        self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._remember_best)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def _remember_best(self, validator: Engine) -> None:
        # Compared here rather than read from validator.state so a resumed run (whose new
        # validator starts with no best) keeps the best of the whole run.
        key = validator.state.key_metric_name
        score = float(validator.state.metrics[key])
        if self.best is None or score > float(self.best[key]):
            self.best = {"epoch": int(validator.state.epoch), **{k: float(v) for k, v in validator.state.metrics.items()}}

    def state_dict(self) -> dict:
        return {"best": self.best or {}}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best") or {}) or None

    def report(self, engine: Engine) -> None:
        if self.best is None:
            self.logger.warning("no validation ran: no table to report")
            return
        table = format_validation_table(self.best)
        print(table, flush=True)
        if self.output_path:
            atomic_write_text(self.output_path, table + "\n")


def format_validation_table(metrics: dict) -> str:
    """Markdown table: rows = maps (modalities, fused), columns = DSC and slice accuracy."""
    found = {key.split("val_dsc_", 1)[1] for key in metrics if key.startswith("val_dsc_")}
    names = [m for m in MODALITIES if m in found] + sorted(found - set(MODALITIES))
    lines = [
        f"Validation at the best epoch ({metrics.get('epoch', '?')}): per-volume DSC at threshold 0.5",
        "",
        "| map | DSC (%) | slice accuracy (%) |",
        "|---|---|---|",
    ]
    for name in names:
        dsc = 100 * float(metrics[f"val_dsc_{name}"])
        acc = metrics.get(f"val_acc_{name}")
        acc_text = f"{100 * float(acc):.1f}" if acc is not None else "-"
        lines.append(f"| {name} | {dsc:.1f} | {acc_text} |")
    return "\n".join(lines)


class CAMImageWriter:
    """At every validation, write CAM overlays to TensorBoard: per modality, the original
    view and the transformed view of a few fixed tumour slices (the equivariance the
    method trains for, visible epoch by epoch).

    `dataset` is a SliceDataset (items with "image" (K, H, W), "label", "mask"); the
    transform is drawn once, from its own seed, so every epoch shows the same views.

    Args:
        network: the MultiModalCAM being trained.
        dataset: the SliceDataset the example slices come from.
        log_dir: TensorBoard folder.
        transform_kind: kind of the transform pi shown.
        num_slices: tumour slices shown.
        seed: seed of the drawn transform.
        tag: TensorBoard tag prefix.
    """

    def __init__(self, network, dataset, log_dir: str, transform_kind: str = "rotation", num_slices: int = 4,
                 seed: int = 0, tag: str = "cams"):
        self.network, self.dataset, self.log_dir = network, dataset, log_dir
        self.transform_kind, self.num_slices, self.seed, self.tag = transform_kind, num_slices, seed, tag
        self.writer = None

    def attach(self, validator: Engine) -> None:
        validator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _examples(self):
        import torch

        labels = getattr(self.dataset, "labels", None)
        indices = [i for i in range(len(self.dataset)) if labels is None or int(labels[i]) == 1]
        step = max(1, len(indices) // self.num_slices)
        items = [self.dataset[i] for i in indices[::step][: self.num_slices]]
        return torch.stack([torch.as_tensor(i["image"]) for i in items]), torch.stack([torch.as_tensor(i["mask"]) for i in items])

    def __call__(self, validator: Engine) -> None:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        from .equivariance import draw_transform
        from .figures import cam_overlay_grid
        from .losses import tumour_cam

        if len(self.dataset) == 0:
            return
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        images, masks = self._examples()
        device = next(self.network.parameters()).device
        transform = draw_transform(self.transform_kind, images.shape[0], images.shape[-2], images.shape[-1],
                                   torch.Generator().manual_seed(self.seed))
        images_t, masks_t = transform.apply(images), transform.apply(masks)
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            for k, (name, net) in enumerate(zip(self.network.modalities, self.network.nets)):
                cam = tumour_cam(net(images[:, k:k + 1].to(device))).cpu()[:, 0]
                cam_t = tumour_cam(net(images_t[:, k:k + 1].to(device))).cpu()[:, 0]
                grid = cam_overlay_grid(list(images[:, k]) + list(images_t[:, k]), list(cam) + list(cam_t),
                                        list(masks[:, 0] > 0.5) + list(masks_t[:, 0] > 0.5), ncols=images.shape[0])
                self.writer.add_image(f"{self.tag}/{name} (top: x, bottom: pi(x))", grid, validator.state.epoch,
                                      dataformats="HWC")
        self.writer.flush()
        self.network.train(was_training)
