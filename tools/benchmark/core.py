"""Performance benchmark: one table of training, data, inference, map and memory figures.

    python -m scripts.benchmark [--quick] [--device cpu|cuda] [--amp] [--out FILE.md]
                                [--base-channels 64] [--sizes 128 240] [--batch-size 16] [--ks 1 2 4]
                                [--repeats N] [--warmup N] [--threads N] [--clock wall|process]
                                [--parts training,data,inference,maps,memory,gpu] [--profile FILE.md]

Results, targets and profiles of this machine: docs/performance.md.

Everything is measured side by side in the same run on the same networks and inputs, and
printed as ONE markdown table headed by the machine (CPU, cores, torch threads, GPU,
versions, load). Rows:

- training: slices/s of the real `CMERTrainer` (its `_iteration`, ignite engine, a
  StatsHandler logging every loss term) for K = 1, 2, 4 modality networks, with the
  overhead ratio = step time / the bare networks' forward + backward over the same 2B
  slices with a plain loss, and a reference step written the way the authors' code works
  (two forwards per network, one backward and optimiser step per network in turn, each
  network's loss recomputed with the others' maps detached). Ours, bare and reference run
  one after the other on fresh networks, each with its own warm-up steps.
  Transform kinds are cycled (translation, scale at its largest, rotation, flip) with fixed
  parameters, so R repeats measure the first R kinds, the most expensive first.
- data: slices/s the training DataLoader (SliceDataset over VolumeCache, train.yaml's
  batch size and workers) delivers from the cache versus what training consumes (K = 4 at
  the largest size), and the time to decode + cache one BraTS-size subject (synthetic
  240x240x155 NIfTI files written with nibabel).
- inference: seconds per four-modality volume end to end (configs/inference.yaml through
  MONAI's ConfigParser: read, preprocess, maps, fusion, invert, write), against the bare
  networks' forward over the same slices.
- maps: GradCAM++ slices/s, `scripts.maps.gradcampp_maps` (batched) versus MONAI's
  `GradCAMpp` (one slice at a time) and pytorch-grad-cam when installed, with the maximum
  difference of the normalised maps (computed without TF32).
- memory: peak RSS (and peak GPU memory) of training K = 4 at the largest size, ours and
  the bare networks, each in its own subprocess so that peaks do not mix.
- gpu path (cuda only): every op of one training step is audited (TorchDispatchMode): ops
  producing data-sized CPU tensors (a fallback) and host syncs, attributed to their caller.

`--quick` uses tiny sizes (32x32, base 4, one repeat) so CI checks that it runs. Speeds are
never asserted anywhere. Needs only torch, monai, ignite, nibabel and numpy (PyYAML for
the inference config, with a fallback to the same pieces without it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from scripts import precision as P
from scripts.common import MODALITIES, TUMOUR_CHANNEL
from scripts.losses import (
    ObjectiveConfig,
    classification_loss,
    cmer_loss,
    er_loss,
    kd_loss,
    l2_normalise,
    tumour_cam,
)

BUNDLE_ROOT = Path(__file__).resolve().parent.parent
# Most expensive first: with R < 4 repeats the first R kinds are measured (conservative).
CYCLED_KINDS = ("translation", "scale", "rotation", "flip")
TRAIN_CONFIG_DEFAULTS = {"batch_size": 16, "num_workers": 0}
GB = 1024**3
PARTS = ("training", "precision", "data", "inference", "maps", "memory", "gpu")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}

# Targets of the issue.
MAX_OVERHEAD = 1.15
MIN_LOADER_MARGIN = 3.0
MAX_INFERENCE_RATIO = 1.3
MIN_GRADCAM_SPEEDUP = 5.0
MAX_MAP_DIFFERENCE = 1e-4
MAX_TRAIN_RSS_GB = 4.0
MAX_OVERHEAD_BF16 = 1.10  # issue 10: trainer over bare networks in bf16


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    device: torch.device
    amp: bool
    quick: bool
    base_channels: int
    sizes: tuple[int, ...]
    batch_size: int
    repeats: int
    warmup: int
    ks: tuple[int, ...] = (1, 2, 4)
    volume_depth: int = 155
    slice_batch_size: int = 32  # inference.yaml's slice_batch_size
    inference_volumes: int = 2  # the last one is reported (the first warms up)
    gradcam_slices: int = 16
    clock: str = "wall"  # or "process": CPU seconds of this process, steadier on a shared CPU
    parts: tuple[str, ...] = PARTS
    precision: str = "fp32"  # the one in use (resolved: bf16 | fp16 | fp32); amp = precision != fp32
    precisions: tuple[str, ...] = ("fp32",)  # training rows are measured once per precision
    channels_last: bool = False
    low_memory: bool = False  # the memory part's ours: one network's graph at a time
    compile: bool = False

    @property
    def largest(self) -> int:
        return max(self.sizes)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.clock == "process" and device.type == "cuda":
        raise SystemExit("--clock process measures CPU time only: use the wall clock with --device cuda")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if args.ks and not set(args.ks) <= {1, 2, 3, 4}:
        raise SystemExit(f"--ks: each K must be 1..4 (modalities), got {args.ks}")
    # Warm-up: on a CPU two steps (a method's heap reaches its steady layout on the second);
    # on cuda one pass over the transform cycle (each new shape costs plan selection once).
    repeats = args.repeats or (1 if args.quick else 4)
    default_warmup = 1 if args.quick else (2 if device.type == "cpu" else min(repeats, len(CYCLED_KINDS)))
    if args.precisions:
        precisions = [P.resolve_precision(p, device) for p in args.precisions]
    elif args.amp:
        precisions = [P.resolve_precision("auto", device)]
    else:  # fp32 and, where the CPU has native bf16, bf16 side by side
        precisions = ["fp32"] + (["bf16"] if device.type == "cpu" and P.cpu_supports_bf16() else [])
    precisions = list(dict.fromkeys(precisions))
    common = {"device": device, "amp": precisions[-1] != "fp32", "precision": precisions[-1],
              "precisions": tuple(precisions), "channels_last": not args.no_channels_last,
              "low_memory": args.low_memory, "compile": args.compile,
              "quick": args.quick, "batch_size": args.batch_size or 16,
              "ks": tuple(args.ks or (1, 2, 4)),
              "warmup": default_warmup if args.warmup is None else args.warmup, "clock": args.clock, "parts": parts}
    if args.quick:
        return Settings(**common, base_channels=args.base_channels or 4, sizes=tuple(args.sizes or (32,)),
                        repeats=repeats, volume_depth=12, slice_batch_size=8, gradcam_slices=4)
    # With no warm-up, one inference volume is enough (the first one is the warm-up).
    return Settings(**common, base_channels=args.base_channels or 64, sizes=tuple(args.sizes or (128, 240)),
                    repeats=repeats, inference_volumes=1 if args.warmup == 0 else 2)


def train_config_value(key: str) -> int:
    """A top-level integer of configs/train.yaml (batch_size, num_workers), without PyYAML."""
    path = BUNDLE_ROOT / "configs" / "train.yaml"
    if path.is_file():
        match = re.search(rf"^{key}:\s*(\d+)", path.read_text(), flags=re.MULTILINE)
        if match:
            return int(match.group(1))
    return TRAIN_CONFIG_DEFAULTS[key]


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    area: str
    case: str
    measured: str
    compared: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""


HEADER = ("Area", "Case", "Measured", "Compared with", "Ratio", "Target", "Verdict")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = (row.area, row.case, row.measured, row.compared, row.ratio, row.target, row.verdict)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def failed_row(area: str, case: str, err: BaseException) -> Row:
    """A part that crashed is reported in the table rather than losing the other figures."""
    return Row(area, case, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}",
               verdict="**missed**")


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_lines(s: Settings) -> list[str]:
    import ignite
    import monai

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "none used"
    allocator = ", glibc heap for large tensors (trainer's keep_cpu_tensors_on_heap)" if s.device.type == "cpu" else ""
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {cores} cores usable, torch threads {torch.get_num_threads()}",
        f"- GPU: {gpu}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, "
        f"ignite {ignite.__version__}",
        f"- settings: device {s.device}, precisions {list(s.precisions)}, channels_last {s.channels_last}, "
        f"compile {s.compile}, base_channels {s.base_channels}, sizes {list(s.sizes)}, "
        f"batch {s.batch_size}, K {list(s.ks)}, repeats {s.repeats} (+{s.warmup} warm-up), "
        f"{s.clock} clock, {'quick' if s.quick else 'full'} run{allocator}",
    ]


def load_line(label: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"- load average {label}: {one:.2f} {five:.2f} {fifteen:.2f}"


# --------------------------------------------------------------------------- timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_clock = time.perf_counter  # set from --clock by main()


def now() -> float:
    return _clock()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def time_calls(fn: Callable[[], object], s: Settings) -> float:
    """Median seconds of `s.repeats` calls after `s.warmup` untimed ones."""
    for _ in range(s.warmup):
        fn()
    return median([timed(fn, s.device) for _ in range(s.repeats)])


def autocast(s: Settings):
    return P.autocast(s.device, s.precision)


@contextlib.contextmanager
def full_precision():
    """No TF32 while maps are compared: 1e-4 is below TF32 rounding of a convolution."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- inputs


def synthetic_batch(batch_size: int, k: int, size: int, seed: int = 0) -> dict:
    """A CPU batch as the training DataLoader delivers it; every other slice holds a bright blob."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, k, size, size, generator=generator) * 0.5
    mask = torch.zeros(batch_size, 1, size, size)
    low, high = size // 4, size // 4 + max(2, size // 6)
    mask[1::2, :, low:high, low:high] = 1.0
    image = image + 2.0 * mask
    labels = torch.tensor([i % 2 for i in range(batch_size)], dtype=torch.int64)
    return {"image": image, "label": labels, "mask": mask}


def build_network(k: int, s: Settings, seed: int = 0):
    from scripts.networks import MultiModalCAM

    torch.manual_seed(seed)
    network = MultiModalCAM(list(MODALITIES[:k]), base_channels=s.base_channels).to(s.device)
    return P.to_memory_format(network, s.channels_last)


# --------------------------------------------------------------------------- training: ours


def cycling_sampler(repeats: int, kinds=CYCLED_KINDS):
    """A TransformSampler that replays a fixed cycle of transforms instead of drawing them.

    Step i uses kinds[i % n], n = min(repeats, 4), with that kind's parameters drawn once
    (the same for every method), and the scale at the top of its range (the largest canvas,
    two passes): every method sees the same shapes, and a warm-up of n steps has met them all
    (on a GPU a new shape costs kernel and cuDNN plan selection once).
    """
    from scripts import equivariance
    from scripts.trainer import TransformSampler

    cycle = list(kinds)[:max(1, min(repeats, len(kinds)))]

    class CyclingSampler(TransformSampler):
        draws = 0

        def draw(self, batch_size, height, width):
            index = self.draws % len(cycle)
            self.draws += 1
            config = dict(self.config)
            if cycle[index] == "scale":
                high = float(equivariance.resolve_config(config)["scale_range"][1])
                config["scale_range"] = (high, high)
            generator = torch.Generator().manual_seed(1000 + index)  # fixed parameters per kind
            return equivariance.draw_transform(cycle[index], batch_size, height, width, generator, config)

    return CyclingSampler(cycle, seed=0)


def quiet_stats_handler():
    """The real StatsHandler (every loss scalar, every iteration) writing to a NullHandler."""
    from monai.handlers import StatsHandler

    from scripts.trainer import loss_scalars

    logger = logging.getLogger("scripts.benchmark.train")
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return StatsHandler(name=logger.name, tag_name="train_loss", iteration_log=True, epoch_log=False,
                        output_transform=loss_scalars)


def make_trainer(network, batch: dict, steps: int, s: Settings, concat_views: bool = True):
    """The bundle's CMERTrainer over `steps` copies of one CPU batch (moved to the device by _iteration)."""
    from scripts.trainer import CMERTrainer, ModalityOptimizers, build_objective

    return CMERTrainer(
        device=s.device, max_epochs=1, train_data_loader=[batch] * steps, epoch_length=steps, network=network,
        optimizers=ModalityOptimizers(network), objective=build_objective("weak", None),
        transform_sampler=cycling_sampler(s.repeats), train_handlers=[quiet_stats_handler()],
        precision=s.precision, channels_last=s.channels_last, low_memory=s.low_memory, compile=s.compile,
        concat_views=concat_views,
    )


# --------------------------------------------------------------------------- training: reference


def reference_loss(k: int, maps_o: list, maps_t: list, labels: torch.Tensor, transform, cfg: ObjectiveConfig,
                   lambda_e: float) -> torch.Tensor:
    """Eq. 8 of network k alone, recomputed from scratch; every partner map is detached first.

    As the authors' code does: each network's loss rebuilds the partners' CAMs, their
    L2-normalised transformed maps and predictions, instead of sharing them across networks.
    Covers the paper's configuration (all terms, normalisation before the transform).
    """
    own_o, own_t = maps_o[k].float(), maps_t[k].float()
    partners = [j for j in range(len(maps_o)) if j != k]
    logits_o, logits_t = own_o.mean(dim=(2, 3)), own_t.mean(dim=(2, 3))
    loss = classification_loss(logits_o, logits_t, labels)
    cam_o, cam_t = tumour_cam(own_o), tumour_cam(own_t)
    equivariance = er_loss(transform.apply(cam_o), cam_t, labels, cfg)
    if partners:
        kd, cmer = 0.0, 0.0
        own_pi_l2 = transform.apply(l2_normalise(cam_o, cfg.eps))
        for j in partners:
            partner_o, partner_t = maps_o[j].detach().float(), maps_t[j].detach().float()
            partner_logits_o, partner_logits_t = partner_o.mean(dim=(2, 3)), partner_t.mean(dim=(2, 3))
            kd = kd + kd_loss(logits_o, partner_logits_o, logits_t, partner_logits_t, cfg.kd_temperature)
            partner_pi_l2 = transform.apply(l2_normalise(tumour_cam(partner_o), cfg.eps))
            cmer = cmer + cmer_loss(own_pi_l2, cam_t, partner_pi_l2, tumour_cam(partner_t), labels,
                                    partner_logits_o.argmax(dim=1) == TUMOUR_CHANNEL,
                                    partner_logits_t.argmax(dim=1) == TUMOUR_CHANNEL, cfg)
        loss = loss + cfg.lambda_kd * kd / len(partners)
        equivariance = equivariance + cmer / len(partners)
    return loss + lambda_e * equivariance


def cuda_grad_scaler():
    """torch.amp.GradScaler('cuda') (torch >= 2.3), else the older torch.cuda.amp one."""
    scaler_class = getattr(torch.amp, "GradScaler", None)
    return scaler_class("cuda") if scaler_class is not None else torch.cuda.amp.GradScaler()


class ReferenceStep:
    """One training step the straightforward way, on its own networks and optimisers.

    Per batch: one transform; every network runs the original view, then separately the
    transformed view; then, network by network, its loss is recomputed, backpropagated and
    its optimiser stepped; every loss is logged with `.item()`.
    """

    def __init__(self, network, s: Settings, lr: float = 5e-5, weight_decay: float = 0.1):
        self.network = network
        self.s = s
        self.cfg = ObjectiveConfig()
        self.sampler = cycling_sampler(s.repeats)
        self.optimizers = [torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
                           for net in network.nets]
        use_scaler = P.uses_grad_scaler(s.device, s.precision)
        self.scalers = [cuda_grad_scaler() if use_scaler else None for _ in network.nets]

    def __call__(self, batch: dict, lambda_e: float = 1.0) -> dict:
        device = self.s.device
        images = batch["image"].to(device).float()
        labels = batch["label"].to(device).long().view(-1)
        transform = self.sampler.draw(images.shape[0], images.shape[-2], images.shape[-1])
        images_t = transform.apply(images)
        nets = list(self.network.nets)
        self.network.train()
        with autocast(self.s):
            maps_o = [net(images[:, k:k + 1]) for k, net in enumerate(nets)]
            maps_t = [net(images_t[:, k:k + 1]) for k, net in enumerate(nets)]
        logged = {}
        for k, (optimizer, scaler) in enumerate(zip(self.optimizers, self.scalers)):
            with autocast(self.s):
                loss = reference_loss(k, maps_o, maps_t, labels, transform, self.cfg, lambda_e)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            logged[self.network.modalities[k]] = loss.item()
        return logged


# --------------------------------------------------------------------------- training: bare networks


class BareStep:
    """The K networks' forward + backward over 2B slices with a plain loss (CE of the GAP logits)."""

    def __init__(self, network, batch: dict, s: Settings):
        self.network = network
        self.s = s
        image = batch["image"].to(s.device)
        self.views = torch.cat([image, torch.flip(image, dims=[-1])], dim=0)  # [x ; pi(x)]: 2B slices
        self.labels = batch["label"].to(s.device).repeat(2)

    def __call__(self) -> None:
        self.network.train()
        self.network.zero_grad(set_to_none=True)
        total = 0.0
        with autocast(self.s):
            for k, net in enumerate(self.network.nets):
                maps = net(self.views[:, k:k + 1])
                total = total + F.cross_entropy(maps.float().mean(dim=(2, 3)), self.labels)
        total.backward()


# --------------------------------------------------------------------------- training: measurement


@dataclass
class StepTimes:
    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)


def measure_training(k: int, size: int, s: Settings) -> StepTimes:
    """Ours (the real trainer over warm-up + repeats steps), then bare, then reference, each in
    a block on its own fresh networks: each reaches its steady state (allocator included)
    after its own warm-up, which interleaving does not give on a CPU heap."""
    from ignite.engine import Events

    batch = synthetic_batch(s.batch_size, k, size)
    trainer = make_trainer(build_network(k, s), batch, s.warmup + s.repeats, s)
    times, started = StepTimes(), [0.0]

    def start(engine) -> None:
        synchronize(s.device)
        started[0] = now()

    def stop(engine) -> None:
        synchronize(s.device)
        if engine.state.iteration > s.warmup:
            times.ours.append(now() - started[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)  # after the StatsHandler: logging counts
    trainer.run()
    del trainer
    bare = BareStep(build_network(k, s), batch, s)
    times.bare = [timed(bare, s.device) for _ in range(s.warmup + s.repeats)][s.warmup:]
    del bare
    reference = ReferenceStep(build_network(k, s), s)
    times.reference = [timed(lambda: reference(batch), s.device) for _ in range(s.warmup + s.repeats)][s.warmup:]
    return times


def training_rows(s: Settings, progress: Callable[[str], None] = lambda message: None) -> tuple[list[Row], dict]:
    """Ours, bare and reference per size, K and precision (precisions side by side in one run)."""
    rows, consumed = [], {}
    for size in s.sizes:
        for k in s.ks:
            for precision in s.precisions:
                p_rows, speed = _training_case(replace(s, precision=precision, amp=precision != "fp32"), k, size,
                                               progress)
                rows += p_rows
                consumed[(k, size)] = max(consumed.get((k, size), 0.0), speed)
    return rows, consumed


def _training_case(s: Settings, k: int, size: int, progress) -> tuple[list[Row], float]:
    rows = []
    case = f"K={k}, {size}x{size}, B={s.batch_size}, {s.precision}"
    try:
        times = measure_training(k, size, s)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return [failed_row("training", case, err)], 0.0
    ours, bare, reference = median(times.ours), median(times.bare), median(times.reference)
    overhead = ours / bare
    on_cpu = s.device.type == "cpu"
    limit = MAX_OVERHEAD_BF16 if s.precision == "bf16" else MAX_OVERHEAD
    rows.append(Row("training", f"{case}: ours (CMERTrainer)", f"{s.batch_size / ours:.2f} slices/s",
                    f"bare nets fwd+bwd on 2B: {s.batch_size / bare:.2f} slices/s",
                    f"overhead {overhead:.2f}", f"<= {limit}" + ("" if on_cpu else " (CPU target)"),
                    verdict(overhead <= limit)))
    rows.append(Row("training", f"{case}: reference (authors' way)", f"{s.batch_size / reference:.2f} slices/s",
                    f"ours {s.batch_size / ours:.2f} slices/s", f"reference/ours {reference / ours:.2f}",
                    "> 1 (ours faster)", verdict(reference > ours)))
    progress(f"  {case}: ours {s.batch_size / ours:.2f}, bare {s.batch_size / bare:.2f}, "
             f"reference {s.batch_size / reference:.2f} slices/s")
    return rows, s.batch_size / ours


# --------------------------------------------------------------------------- data


def write_synthetic_subject(folder: Path, subject: str, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """BraTS-layout NIfTI files (int16 images, uint8 seg) of an ellipsoid brain with a tumour."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2 < 1.0
    tumour = (x - 0.3) ** 2 + (y - 0.2) ** 2 + (z - 0.1) ** 2 < 0.2**2
    contrasts = {"t1": (400, -120), "t1ce": (420, 250), "t2": (300, 350), "flair": (350, 300)}
    files = {}
    for name, (tissue, lesion) in contrasts.items():
        volume = brain * (tissue + 20.0 * x + rng.normal(0.0, 15.0, shape)) + tumour * lesion
        path = folder / f"{subject}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(volume, 0, 32000).astype(np.int16), np.eye(4)), str(path))
        files[name] = str(path)
    seg_path = folder / f"{subject}_seg.nii.gz"
    nib.save(nib.Nifti1Image((tumour * 2).astype(np.uint8), np.eye(4)), str(seg_path))
    images = {"t1": files["t1"], "t1c": files["t1ce"], "t2": files["t2"], "flair": files["flair"]}
    return {"subject": subject, "grade": None, "images": images, "seg": str(seg_path)}


def loader_slices_per_second(record: dict, cache, s: Settings) -> tuple[float, int, int]:
    """Slices/s of train.yaml's DataLoader over the cached subject, two full passes."""
    from scripts.datasets import SliceDataset

    batch_size, workers = train_config_value("batch_size"), train_config_value("num_workers")
    dataset = SliceDataset([record], cache, modalities=MODALITIES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    delivered, start = 0, now()
    for _ in range(2):
        for batch in loader:
            delivered += batch["image"].shape[0]
    return delivered / (now() - start), batch_size, workers


def data_rows(s: Settings, work: Path, consumed: dict) -> tuple[list[Row], dict]:
    from scripts.datasets import VolumeCache

    size, shape = s.largest, (s.largest, s.largest, s.volume_depth)
    record = write_synthetic_subject(work / "data" / "Bench_000", "Bench_000", shape)
    cache = VolumeCache(work / "cache", spatial_size=(size, size))
    start = now()
    cache.info(record)  # decode the five NIfTI files, MONAI preprocessing, write the memory-mapped cache
    build_s = now() - start
    rows = [Row("data", f"decode + cache one subject {'x'.join(map(str, shape))}, 4 modalities + seg",
                f"{build_s:.2f} s", verdict=verdict(None))]
    delivered, batch_size, workers = loader_slices_per_second(record, cache, s)
    k = max(s.ks)
    need = consumed.get((k, size))
    if need is None:
        rows.append(Row("data", "loader from cache", f"{delivered:.1f} slices/s", "training figure missing",
                        verdict="n/a"))
    else:
        margin = delivered / need
        rows.append(Row("data", f"loader from cache ({size}x{size}, batch {batch_size}, {workers} workers)",
                        f"{delivered:.1f} slices/s", f"training K={k} {size}x{size} consumes {need:.2f} slices/s",
                        f"{margin:.1f}x", f">= {MIN_LOADER_MARGIN:g}x", verdict(margin >= MIN_LOADER_MARGIN)))
    return rows, record


# --------------------------------------------------------------------------- inference


def save_checkpoint(network, path: Path) -> Path:
    torch.save(network.state_dict(), path)
    return path


def subject_dataset(record: dict, root: Path, copies: int) -> Path:
    """A dataset folder with `copies` subjects (hard links or copies of one subject's files)."""
    import shutil

    for i in range(copies):
        subject = f"Bench_{i:03d}"
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        sources = {**{("t1ce" if m == "t1c" else m): p for m, p in record["images"].items()}, "seg": record["seg"]}
        for name, source in sources.items():
            target = folder / f"{subject}_{name}.nii.gz"
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy(source, target)
    return root


def inference_through_config(s: Settings, dataset_dir: Path, ckpt: Path, out_dir: Path) -> tuple[list[float], object]:
    """configs/inference.yaml run through MONAI's ConfigParser; seconds per volume and its network."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    import scripts.inference as inference

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["dataset_dir"] = str(dataset_dir)
    parser["output_dir"] = str(out_dir)
    parser["ckpt_path"] = str(ckpt)
    parser["base_channels"] = s.base_channels
    parser["spatial_size"] = [s.largest, s.largest]
    parser["device"] = f"$torch.device('{s.device}')"
    parser["num_workers"] = 0
    evaluator = parser.get_parsed_content("evaluator")
    seconds, started = [], [0.0]
    # Per subject: from fetching it (read + preprocess in the loader) to its files written.
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: started.__setitem__(0, now()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seconds.append(now() - started[0]))
    with contextlib.redirect_stdout(io.StringIO()):  # its per-subject lines would break the table
        inference.run_engine(evaluator)
    return seconds, parser.get_parsed_content("network")


def inference_from_pieces(s: Settings, record: dict, network, out_dir: Path) -> list[float]:
    """Fallback without the bundle config: preprocessing + scripts.maps + fusion + NIfTI write."""
    import nibabel as nib

    from scripts.datasets import preprocess_subject
    from scripts.map_engine import volume_maps
    from scripts.maps import binarise, fuse_maps

    seconds = []
    for i in range(s.inference_volumes):
        start = now()
        volume = preprocess_subject(record, (s.largest, s.largest))["image"]
        maps = volume_maps(network, torch.from_numpy(volume), "cam", s.slice_batch_size)
        fused = fuse_maps(torch.stack(list(maps.values()))[None], "max")[0].numpy()
        nib.save(nib.Nifti1Image(fused.astype(np.float32), np.eye(4)), str(out_dir / f"fused_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(binarise(fused).astype(np.uint8), np.eye(4)), str(out_dir / f"mask_{i}.nii.gz"))
        seconds.append(now() - start)
    return seconds


def bare_forward_seconds(network, record: dict, s: Settings) -> float:
    """The K networks' forward alone over the same slices, already on the device."""
    from scripts.datasets import preprocess_subject

    volume = torch.from_numpy(preprocess_subject(record, (s.largest, s.largest))["image"])
    slices = volume.permute(3, 0, 1, 2).contiguous().to(s.device)  # (D, K, H, W)
    network.eval()

    def forward_all() -> None:
        with torch.no_grad():
            for start in range(0, slices.shape[0], s.slice_batch_size):
                chunk = slices[start:start + s.slice_batch_size]
                for k, net in enumerate(network.nets):
                    net(chunk[:, k:k + 1])

    forward_all()  # warm-up
    return timed(forward_all, s.device)


def inference_rows(s: Settings, work: Path, record: dict) -> list[Row]:
    network = build_network(len(MODALITIES), s)
    ckpt = save_checkpoint(network, work / "model.pt")
    out_dir = work / "inference_out"
    out_dir.mkdir(exist_ok=True)
    how = "configs/inference.yaml"
    try:
        import yaml  # noqa: F401 - the bundle config needs PyYAML

        import scripts.inference  # noqa: F401
    except ImportError:
        how = "pieces (no PyYAML or scripts.inference)"
    if how == "configs/inference.yaml":
        dataset_dir = subject_dataset(record, work / "inference_in", s.inference_volumes)
        seconds, network = inference_through_config(s, dataset_dir, ckpt, out_dir)
    else:
        seconds = inference_from_pieces(s, record, network, out_dir)
    per_volume = seconds[-1]
    bare = bare_forward_seconds(network, record, s)
    ratio = per_volume / bare
    shape = f"{s.largest}x{s.largest}x{s.volume_depth}"
    return [Row("inference", f"end to end, {shape}, 4 modalities ({how})", f"{per_volume:.2f} s/volume",
                f"bare forward of the 4 nets: {bare:.2f} s", f"{ratio:.2f}", f"<= {MAX_INFERENCE_RATIO}",
                verdict(ratio <= MAX_INFERENCE_RATIO))]


# --------------------------------------------------------------------------- maps


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
    MONAI puts on the gradient and scripts.maps leaves out (a per-slice constant, which only
    the normaliser's 1e-8 constant can see: at random init the raw maps are ~1e-6)."""
    from scripts.maps import max_normalise

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

    from scripts.maps import gradcampp_maps, max_normalise
    from scripts.networks import UNetCAM

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


# --------------------------------------------------------------------------- peak memory (subprocess)


def memory_child(spec: dict) -> dict:
    """Run two training steps of `spec['kind']` (ours | bare) and return its peaks (in the child)."""
    s = Settings(device=torch.device(spec["device"]), amp=spec["precision"] != "fp32", quick=True,
                 base_channels=spec["base"], sizes=(spec["size"],), batch_size=spec["batch"], repeats=1, warmup=1,
                 precision=spec["precision"], channels_last=spec["channels_last"], low_memory=spec["low_memory"])
    k = spec["k"]
    batch = synthetic_batch(s.batch_size, k, spec["size"])
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    if spec["kind"] == "ours":
        make_trainer(build_network(k, s), batch, 2, s).run()
    else:
        from scripts.trainer import keep_cpu_tensors_on_heap

        if s.device.type == "cpu":
            keep_cpu_tensors_on_heap()  # as the trainer does, so that the two children compare
        bare = BareStep(build_network(k, s), batch, s)
        bare()
        bare()
    synchronize(s.device)
    gpu = torch.cuda.max_memory_allocated(s.device) / GB if s.device.type == "cuda" else None
    return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, "gpu_gb": gpu}


def available_memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class CappedOut(RuntimeError):
    """The child ran out of its memory cap: its peak is at least the cap."""

    def __init__(self, cap_gb: float):
        super().__init__(f"over the {cap_gb:.1f} GB cap")
        self.cap_gb = cap_gb


def run_memory_child(spec: dict, timeout: float = 1800) -> dict:
    """Peaks of one child process; on the CPU its data size is capped (70% of the available
    memory) so that a too-large run fails alone instead of pushing a shared machine into the
    OOM killer."""
    cap = available_memory_bytes()
    cap = int(cap * 0.7) if cap and spec["device"] == "cpu" else None

    def limit() -> None:
        if cap:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    command = [sys.executable, "-m", "scripts.benchmark", "--threads", str(torch.get_num_threads()),
               "--memory-child", json.dumps(spec)]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=timeout,
                            preexec_fn=limit)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        if cap and ("alloc" in result.stderr.lower() or "memory" in result.stderr.lower()):
            raise CappedOut(cap / GB)
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"child exited with {result.returncode}: {tail}")
    return json.loads(lines[-1])


def peak_text(peak: dict | CappedOut, key: str) -> tuple[str, float]:
    """('3.21 GB', 3.21), or ('> 6.0 GB (hit the cap)', 6.0) for a child that ran out of its cap."""
    if isinstance(peak, CappedOut):
        return f"> {peak.cap_gb:.1f} GB (hit the cap)", peak.cap_gb
    return f"{peak[key]:.2f} GB", peak[key]


def memory_rows(s: Settings) -> list[Row]:
    k, size = max(s.ks), s.largest
    case = (f"training K={k}, {size}x{size}, B={s.batch_size}, base {s.base_channels}, {s.precision}"
            f"{', low_memory' if s.low_memory else ''}")
    spec = {"k": k, "size": size, "batch": s.batch_size, "base": s.base_channels, "device": str(s.device),
            "precision": s.precision, "channels_last": s.channels_last, "low_memory": s.low_memory}
    peaks = {}
    for kind in ("bare", "ours"):
        try:
            peaks[kind] = run_memory_child({**spec, "kind": kind})
        except CappedOut as capped:
            peaks[kind] = capped
    (ours_text, ours_gb), (bare_text, bare_gb) = peak_text(peaks["ours"], "rss_gb"), peak_text(peaks["bare"], "rss_gb")
    on_cpu = s.device.type == "cpu"
    rows = [Row("memory", f"{case}: peak RSS, ours (own process)", ours_text, f"bare nets {bare_text}",
                f"{ours_gb / bare_gb:.2f}", f"< {MAX_TRAIN_RSS_GB:g} GB" if on_cpu else "",
                verdict(ours_gb < MAX_TRAIN_RSS_GB) if on_cpu else "n/a")]
    if not on_cpu:
        ours, bare = peaks["ours"], peaks["bare"]
        rows.append(Row("memory", f"{case}: peak GPU memory, ours", f"{ours['gpu_gb']:.2f} GB",
                        f"bare nets {bare['gpu_gb']:.2f} GB", f"{ours['gpu_gb'] / bare['gpu_gb']:.2f}", "", "n/a"))
    return rows


# --------------------------------------------------------------------------- GPU path audit


def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class DeviceAudit(_dispatch_mode_base()):
    """Every aten op of a training step: CPU fallbacks and host syncs, with their callers.

    A fallback is an op that produces a CPU tensor of at least one slice's size (the transform
    parameters drawn on the CPU by design are far smaller). A host sync is an op that turns
    device data into a Python value or a CPU tensor (.item(), .cpu(), nonzero, ...).
    """

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")
    # From pageable host memory a blocking upload waits for the queued GPU work: a hidden sync.
    UPLOAD_OPS = ("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize")

    def __init__(self, slice_numel: int):
        super().__init__()
        self.slice_numel = slice_numel
        self.ops = 0
        self.fallbacks: Counter = Counter()
        self.syncs: Counter = Counter()
        self.uploads: Counter = Counter()

    @staticmethod
    def _caller() -> str:
        """The innermost frame outside torch and this file: who asked for the op."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and not frame.filename.endswith("benchmark.py"):
                return f"{Path(frame.filename).name}:{frame.name}"
        return "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        from_device = any(t.device.type != "cpu" for t in inputs)
        name = func.overloadpacket.__name__
        if name in self.UPLOAD_OPS and any(t.device.type == "cpu" for t in inputs) and \
                any(t.device.type != "cpu" for t in outputs):
            self.uploads[f"{name} from {self._caller()}"] += 1
        elif from_device and (name in self.SYNC_OPS or any(t.device.type == "cpu" for t in outputs)):
            self.syncs[f"{name} from {self._caller()}"] += 1
        elif any(t.device.type == "cpu" and t.numel() >= self.slice_numel for t in outputs):
            self.fallbacks[f"{name} from {self._caller()}"] += 1
        return out


def gpu_path_rows(s: Settings) -> list[Row]:
    if s.device.type == "cpu":
        return [Row("gpu path", "CPU fallbacks / host syncs in the step", "not checked (CPU run)", verdict="n/a")]
    k, size = max(s.ks), s.largest
    trainer = make_trainer(build_network(k, s), synthetic_batch(s.batch_size, k, size), 1, s)
    audit = DeviceAudit(size * size)
    with audit:
        trainer.run()
    logged = sum(isinstance(v, float) for key, v in trainer.state.output.items() if key != "lambda_e")
    syncs = sum(audit.syncs.values())
    detail = "; ".join(f"{n}x {what}" for what, n in audit.syncs.most_common(6))
    fallback_detail = "; ".join(f"{n}x {what}" for what, n in audit.fallbacks.most_common(4)) or "none"
    extra = syncs - logged
    return [
        Row("gpu path", f"one step K={k} {size}x{size}: ops producing data-sized CPU tensors",
            f"{sum(audit.fallbacks.values())} of {audit.ops} ops", fallback_detail, "", "0",
            verdict(not audit.fallbacks)),
        Row("gpu path", f"one step K={k} {size}x{size}: host syncs", f"{syncs}", detail,
            f"{logged} logged scalars + {extra} other", "only the logged scalars (and AMP's inf checks)",
            verdict(extra <= (k + 1 if s.amp else 0))),
        Row("gpu path", f"one step K={k} {size}x{size}: host-to-device copies", f"{sum(audit.uploads.values())}",
            "; ".join(f"{n}x {what}" for what, n in audit.uploads.most_common(6)) or "none", "",
            "the batch and the transform's parameters, before the forward", "n/a"),
    ]


# --------------------------------------------------------------------------- profile (--profile FILE)


PHASES = ("data to device + transform + forward", "loss (Eq. 8)", "backward", "optimiser steps",
          "logging (.item() of every term)")


def phase_seconds(trainer, s: Settings) -> dict:
    """Split ours' steps at the IterationEvents that CMERTrainer._iteration fires (device synced)."""
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents

    marks = (Events.ITERATION_STARTED, IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
             IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED, Events.ITERATION_COMPLETED)
    stamps: dict = {}
    totals = dict.fromkeys(PHASES, 0.0)

    def stamp(engine, index) -> None:
        synchronize(s.device)
        stamps[index] = now()
        if index == len(marks) - 1 and engine.state.iteration > s.warmup:
            for phase, (a, b) in zip(PHASES, zip(range(5), range(1, 6))):
                totals[phase] += (stamps[b] - stamps[a]) / s.repeats

    for index, event in enumerate(marks):
        trainer.add_event_handler(event, stamp, index)
    trainer.run()
    return totals


def write_profile(s: Settings, path: str) -> None:
    """Phase split of ours' step and torch.profiler's top operators, K = max, largest size."""
    from torch.profiler import ProfilerActivity, profile

    k, size = max(s.ks), s.largest
    batch = synthetic_batch(s.batch_size, k, size)
    phases = phase_seconds(make_trainer(build_network(k, s), batch, s.warmup + s.repeats, s), s)
    bare = time_calls(BareStep(build_network(k, s), batch, s), s)
    lines = [f"# Profile of ours' training step: K={k}, {size}x{size}, B={s.batch_size}, base {s.base_channels}, "
             f"{s.device}{', AMP' if s.amp else ''} ({s.clock} clock, mean of {s.repeats})", "",
             "| phase | seconds | share |", "|---|---|---|"]
    total = sum(phases.values())
    lines += [f"| {name} | {sec:.4f} | {sec / total:.1%} |" for name, sec in phases.items()]
    lines += [f"| total | {total:.4f} | bare nets fwd+bwd {bare:.4f} s: overhead {total / bare:.2f} |", ""]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    trainer = make_trainer(build_network(k, s), batch, 2, s)
    trainer.run()  # warm-up
    trainer = make_trainer(build_network(k, s), batch, 1, s)
    with profile(activities=activities) as prof:
        trainer.run()
    keys = ("self_device_time_total", "self_cuda_time_total") if s.device.type == "cuda" else ("self_cpu_time_total",)
    averages = prof.key_averages()
    sort_by = next((key for key in keys if averages and hasattr(averages[0], key)), "self_cpu_time_total")
    lines += ["```", averages.table(sort_by=sort_by, row_limit=30), "```", ""]
    from scripts.common import atomic_write_text

    atomic_write_text(path, "\n".join(lines))


# --------------------------------------------------------------------------- main


def guarded(area: str, make_rows: Callable[[], list[Row]]) -> list[Row]:
    try:
        return make_rows()
    except Exception as err:  # noqa: BLE001 - a crashed part is reported in the table
        return [failed_row(area, area, err)]


class PartLog(dict):
    """Rows per part; each part's rows also go to the progress stream as soon as they exist,
    so a run that is cut short still leaves its figures behind."""

    def __init__(self, progress: Callable[[str], None]):
        super().__init__()
        self.progress = progress

    def __setitem__(self, part: str, rows: list[Row]) -> None:
        super().__setitem__(part, rows)
        for row in rows:
            self.progress(f"  {row.area} | {row.case} | {row.measured} | {row.compared} | {row.ratio} | {row.verdict}")


def run_benchmark(s: Settings, progress: Callable[[str], None]) -> list[Row]:
    """Every part in turn; memory runs first, in children, while this process is still small."""
    parts = PartLog(progress)
    consumed: dict = {}
    if "memory" in s.parts:
        progress("memory (subprocesses)")
        parts["memory"] = guarded("memory", lambda: memory_rows(s))
    if s.device.type == "cpu":
        from scripts.trainer import keep_cpu_tensors_on_heap

        keep_cpu_tensors_on_heap()  # what CMERTrainer does on a CPU: every part runs under the same allocator
    with tempfile.TemporaryDirectory(prefix="cmer-benchmark-") as tmp:
        work = Path(tmp)
        if "training" in s.parts:
            progress("training (ours, bare, reference)")
            parts["training"], consumed = training_rows(s, progress)
        record = None
        if "precision" in s.parts:
            from scripts.benchmark_peak import precision_rows

            progress("precision (matmul peak, bare step's share)")
            parts["precision"] = guarded("precision", lambda: precision_rows(s, progress))
        if "data" in s.parts or "inference" in s.parts:
            progress("data")
            try:
                data, record = data_rows(s, work, consumed)
                parts["data"] = data if "data" in s.parts else []
            except Exception as err:  # noqa: BLE001 - reported in the table
                parts["data"] = [failed_row("data", "loader / cache", err)]
        if "inference" in s.parts and record is not None:
            progress("inference")
            parts["inference"] = guarded("inference", lambda: inference_rows(s, work, record))
        if "maps" in s.parts:
            progress("maps")
            parts["maps"] = guarded("maps", lambda: map_rows(s))
        if "gpu" in s.parts:
            progress("gpu path")
            parts["gpu"] = guarded("gpu path", lambda: gpu_path_rows(s))
    return [row for part in PARTS for row in parts.get(part, [])]


def report(s: Settings, rows: list[Row], load_before: str, command: str) -> str:
    lines = [f"## Benchmark ({'quick' if s.quick else 'full'}, {s.device}{', AMP' if s.amp else ''})", "",
             f"Command: `{command}`", ""]
    lines += machine_lines(s) + [load_before, load_line("after"), "", markdown_table(rows), ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs (CI)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="precision auto only (bf16 on a bf16 CPU; fp16 + "
                        "GradScaler on cuda)")
    parser.add_argument("--precisions", nargs="+", choices=P.PRECISIONS,
                        help="training precisions side by side (default: fp32, plus bf16 on a CPU with native bf16)")
    parser.add_argument("--no-channels-last", action="store_true", help="NCHW networks (default NHWC, as configured)")
    parser.add_argument("--low-memory", action="store_true", help="the trainer's low_memory step (memory part too)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainer's networks")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--base-channels", type=int, help="UNetCAM width (default 64, the paper's; quick 4)")
    parser.add_argument("--sizes", type=int, nargs="+", help="slice sizes (default 128 240; quick 32)")
    parser.add_argument("--batch-size", type=int, help="training batch (default 16)")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of modality networks (default 1 2 4)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 4 = one per transform kind; quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (default 2 on a CPU; on cuda one "
                        "pass over the transform cycle)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's; quick 1: a shared "
                        "CPU makes multi-threaded tiny ops stall at every barrier)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or process: CPU seconds of this process (1 thread, shared CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--profile", help="also write a profile of ours' step (phases + top operators) here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    s = settings_from_args(args)
    global _clock
    _clock = CLOCKS[s.clock]
    command = "python -m scripts.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = load_line("before")

    def progress(message: str) -> None:
        print(message if message.startswith("  ") else f"[benchmark] {message} ...", file=sys.stderr, flush=True)

    rows = run_benchmark(s, progress)
    text = report(s, rows, load_before, command.strip())
    print(text, flush=True)
    if args.out:
        from scripts.common import atomic_write_text

        atomic_write_text(args.out, text)
    if args.profile:
        progress("profile")
        write_profile(s, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
