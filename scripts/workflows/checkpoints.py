"""Checkpoint handlers: an atomic saver, a resume that also starts fresh, the run's settings.

- `AtomicCheckpointSaver`: MONAI's CheckpointSaver writes with `atomic=False` and, with a
  fixed filename, deletes the old file before writing the new one; a kill in between
  loses the checkpoint. This subclass keeps MONAI's logic and swaps in a saver that
  writes a temporary file and renames it over the old one.
- `ResumeFromCheckpoint`: MONAI's CheckpointLoader, skipped when no checkpoint exists yet,
  so the same config starts fresh or resumes.
- `RunSettings`: the settings that define a run (objective, data, recipe, network), recorded
  in last.pt; a rerun with other values stops naming each difference (`epochs` may differ).
- `RandomStates`: every random stream a run draws from (the slice sampler's and the data
  loader's generators, torch / numpy / python global states), so a resumed run draws exactly
  what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from scripts.common import atomic_path
from scripts.runtime import BundleError


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
    """The settings that define a training run, saved in its last.pt and compared on a rerun.

    train.yaml lists them: the method preset and its objective (with every switch), the
    network (modalities, backbone, base_channels) and preprocessing, the data (a fingerprint
    of the datalist's subjects and split and of the files' sizes, `data_fingerprint`), split,
    seed, lr and its schedule, weight decay, batch size, the per-epoch recipe
    (max_slices_per_epoch, height_bins, balanced_sampling, lambda_e, transforms) and the
    precision. A rerun on the same --ckpt_dir whose values differ stops before epoch 1 with
    one line naming each difference and the fix: another --ckpt_dir, or `--resume false` to
    start over there. `epochs` is not among them: extending a run (a larger --epochs) is
    legitimate; what follows the number of epochs (the lambda_e ramp-up, by default half of
    the epochs, and a cosine learning-rate decay) then follows the new total. Listed first in
    the checkpoint objects; a checkpoint without a key (an older bundle) is not checked on it.

    Args:
        settings: name -> value (nested mappings are compared key by key, named `a#b`).
    """

    def __init__(self, **settings):
        self.settings = {k: _plain(v) for k, v in settings.items()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def differences(self, stored: dict) -> list[str]:
        """`name stored -> now` for each recorded setting whose value differs from this run's."""
        ours, theirs = _flat(self.settings), _flat(stored)
        return [f"{k} {theirs[k]!r} -> {v!r}" for k, v in ours.items() if k in theirs and theirs[k] != v]

    def load_state_dict(self, state: dict) -> None:
        if self.differences(state):
            raise CheckpointError(f"the checkpoint was written by another run ({'; '.join(self.differences(state))}). "
                                  f"Fix: pass another --ckpt_dir, or --resume false to start over.")


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _flat(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}#{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flat(value, name))
        else:
            flat[name] = value
    return flat


def data_fingerprint(datalist) -> dict:
    """What identifies a run's data: hashes of the datalist's subjects per section (the split)
    and of the sizes of every file it lists (12 hex digits each; paths and times are left out,
    so a copied or moved dataset keeps its fingerprint).

    Args:
        datalist: the run's datalist JSON (written or checked by `ensure_dataset` in `initialize`).
    """
    import hashlib
    import json

    from scripts.data.subjects import SECTIONS, DataError, load_datalist

    sections, sizes = {}, []
    for section in SECTIONS:
        try:
            records = load_datalist(datalist, section)
        except DataError:  # a user's datalist without this section
            continue
        sections[section] = [r["subject"] for r in records]
        for record in records:
            paths = [record.get("image4d"), *(p for _, p in sorted((record.get("images") or {}).items())),
                     record.get("seg")]
            sizes += [Path(p).stat().st_size if Path(p).is_file() else -1 for p in paths if p]

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]

    return {"subjects_and_split": digest(sections), "file_sizes": digest(sizes)}


class ResumeFromCheckpoint(CheckpointLoader):
    """Resume from `load_path` when it exists; start fresh (and say so) when it does not.

    A file that cannot be read, or that another run wrote (other `RunSettings` or network
    shapes), stops the run before epoch 1 with one line naming the file, each difference and
    the fix; other files (e.g. models/model.pt) are never touched. With `enabled` False (the
    `resume: false` setting) an existing file is ignored and the run starts over, replacing
    last.pt and model.pt as it goes.

    Args:
        load_path: the checkpoint to resume from (e.g. models/last.pt).
        load_dict: name -> object to restore (the checkpoint objects of train.yaml).
        enabled: False starts a new run even when `load_path` exists (true / false strings accepted).
        kwargs: MONAI CheckpointLoader options (map_location, strict, ...).
    """

    def __init__(self, load_path: str, load_dict: dict, enabled: bool = True, **kwargs):
        from scripts.runtime import as_flag

        super().__init__(load_path=str(load_path), load_dict=load_dict, **kwargs)
        self.enabled = as_flag(enabled, "resume")

    def _fix(self) -> str:
        folder = Path(self.load_path).parent
        return (f"Fix: pass another --ckpt_dir for this run (or the settings of the run that wrote it, to resume it), "
                f"or --resume false to start over in {folder} (move its last.pt and model.pt aside first: they are "
                f"replaced); --epochs may differ (extending a run).")

    def _fix_unreadable(self) -> str:
        return (f"Fix: delete it or use another --ckpt_dir (or --resume false to start over); "
                f"{Path(self.load_path).parent / 'model.pt'} is not touched.")

    def _read(self) -> dict:
        import torch

        try:
            checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # zip errors, EOFError, unpickling errors, ...
            first = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(f"checkpoint {self.load_path} is unreadable ({type(err).__name__}: {first}); it is "
                                  f"truncated or corrupt (a full disk, or a copy cut short). {self._fix_unreadable()}") from err
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"checkpoint {self.load_path} holds a {type(checkpoint).__name__}, not a training "
                                  f"checkpoint. {self._fix_unreadable()}")
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
            raise CheckpointError(f"checkpoint {self.load_path} was written by another run: "
                                  f"{'; '.join(problems)}. {self._fix()}")

    def __call__(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        if not self.enabled:
            if Path(self.load_path).is_file():
                self.logger.info(f"--resume false: starting a new run; {self.load_path} and the model.pt beside it "
                                 f"are replaced as it goes")
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


class RandomStates:
    """Every random stream a training run draws from, as one checkpoint object.

    Saved in last.pt at each epoch end and restored on resume, so the epochs after a resume draw
    what the uninterrupted run drew: the per-epoch slice subset and the balanced draws (the
    sampler's generator, scripts/data/sampling.py), the shuffling order and the workers' base
    seed (the data loader's generator), and the global torch (CPU and CUDA), numpy and python
    states for anything else. The transform sampler keeps its own generator (its checkpoint
    object). A sampler without a generator (torch's DistributedSampler: seed + epoch) needs none.

    Args:
        dataloader: the training DataLoader; its `generator` and its sampler's are recorded.
        generators: further name -> torch.Generator to record.
    """

    def __init__(self, dataloader=None, generators: dict | None = None):
        self.dataloader = dataloader
        self.generators = dict(generators or {})

    def _generators(self) -> dict:
        found, seen = {}, set()
        loader = self.dataloader
        candidates = [("loader", getattr(loader, "generator", None)),
                      ("sampler", getattr(getattr(loader, "sampler", None), "generator", None)),
                      *self.generators.items()]
        for name, generator in candidates:
            if generator is not None and id(generator) not in seen:
                seen.add(id(generator))
                found[name] = generator
        return found

    def state_dict(self) -> dict:
        import torch

        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        state = {"torch": torch.get_rng_state(),
                 "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                 "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                            "gauss_next": gauss_next},
                 "generators": {name: g.get_state() for name, g in self._generators().items()}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import torch

        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                         python_state["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        generators = self._generators()
        missing = sorted(set(state["generators"]) ^ set(generators))
        if missing:
            raise CheckpointError(f"the checkpoint's random streams {sorted(state['generators'])} do not match this "
                                  f"run's {sorted(generators)} (another sampling setting).")
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
