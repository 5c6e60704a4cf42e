"""The benchmark's `memory` part: peak RSS (and GPU memory) of training, ours and the bare
networks, each in its own capped subprocess so that peaks do not mix.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from tools.benchmark.core import BUNDLE_ROOT, GB, MAX_TRAIN_RSS_GB, Row, Settings, build_network, synchronize, synthetic_batch, verdict
from tools.benchmark.training import BareStep, make_trainer


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
        from scripts.method.trainer import keep_cpu_tensors_on_heap

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

    command = [sys.executable, "-m", "tools.benchmark", "--threads", str(torch.get_num_threads()),
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
