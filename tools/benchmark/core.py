"""The benchmark's shared pieces: settings, the table, the machine, timing, inputs.

The benchmark itself is described in tools/benchmark/__init__.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scripts import precision as P
from scripts.common import MODALITIES

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
# Most expensive first: with R < 4 repeats the first R kinds are measured (conservative).
CYCLED_KINDS = ("translation", "scale", "rotation", "flip")
TRAIN_CONFIG_DEFAULTS = {"batch_size": 16, "num_workers": 0}
GB = 1024**3
PARTS = ("training", "precision", "data", "inference", "maps", "memory", "gpu")
# Opt-in parts, not in the default run: `epoch` trains the bundle itself for an epoch; `layers`
# times each convolution of one network in both memory formats (tools/benchmark/layers.py).
EXTRA_PARTS = ("epoch", "layers")
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
    unknown = sorted(set(parts) - set(PARTS) - set(EXTRA_PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {list(PARTS + EXTRA_PARTS)}")
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
        f"- CPU: {cpu_model()} ({P.cpu_kind()}), {cores} cores usable, torch threads {torch.get_num_threads()}",
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


_clock = time.perf_counter  # set from --clock by main() (set_clock)


def set_clock(name: str) -> None:
    """Time with `CLOCKS[name]` from now on (every part reads it through `now`)."""
    global _clock
    _clock = CLOCKS[name]


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
    from scripts.model.networks import MultiModalCAM

    torch.manual_seed(seed)
    network = MultiModalCAM(list(MODALITIES[:k]), base_channels=s.base_channels).to(s.device)
    return P.to_memory_format(network, s.channels_last)
