"""Numeric precision and memory layout of the networks: one named setting for every workflow.

`precision` (configs: train.yaml, evaluate.yaml, inference.yaml) is one of

    auto  float16 autocast (with a GradScaler in training) on CUDA; bfloat16 autocast on a CPU with
          native bf16 (the CPU parity study passed: `CPU_BF16_MASKS_MATCH`, see there); float32 on
          other CPUs
    bf16  bfloat16 autocast on any device (no GradScaler: bf16 has float32's exponent range)
    fp16  float16 autocast; the GradScaler is used on CUDA only
    fp32  no autocast

Autocast only covers the networks' forward (convolutions run in the low precision, their
weights and the optimiser state stay float32); callers cast the maps to float32 before the
max-normaliser, L2 norms, softmax / KL and every loss reduction, and run those outside
autocast. `channels_last` stores 4D weights and activations NHWC, the layout oneDNN's
convolutions prefer on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Precision is a speed choice, never a result choice: `auto` trains in bf16 on a CPU with
# native bf16 only because a run of the default recipe in both precisions
# (`python -m tools.stage1_study --precision fp32 bf16`, docs/performance.md) gave the same masks
# by the rule "every modality within 3 validation DSC points of fp32 at the kept model, fused
# within 2". 2026-12-07, Zen 4 (AVX-512 BF16): at 3 seeds T1 -3.5 and T2 -5.1 (one seed kept
# epoch 5), so the five seeds announced then were run: bf16 - fp32 over seeds 1337 / 7 / 42 / 0 / 1,
# T1 -2.5, T1c -1.1, T2 +1.3, FLAIR +0.1, fused +0.9 (1.7x faster). Seed to seed the per-modality
# differences spread widely (paired sd 6-15 points on T1 / T1c / T2): the rule is met on the mean,
# not shown tight. Set False to make `auto` fp32 on every CPU again; `--precision fp32` forces it.
CPU_BF16_MASKS_MATCH = True
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpuinfo_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kind() -> str:
    """The CPU's vector kind as the records name it (the speed of a run depends on it, its result
    must not): "AMX" (bf16 tiles), "AVX512 + BF16", or torch's own capability ("AVX512", "AVX2",
    "DEFAULT", ...)."""
    flags = _cpuinfo_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512 + BF16"
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "unknown"


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16).

    torch's own cpuinfo queries are asked first (they work on every OS); /proc/cpuinfo is the
    fallback for a torch without them. `mkldnn._is_mkldnn_bf16_supported()` is not used: it
    is also true on AVX512 CPUs that only emulate bf16, where autocast is slower than fp32.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    if probes:
        try:
            return any(bool(p()) for p in probes)
        except RuntimeError:
            pass
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str | None, device) -> str:
    """The concrete precision ('bf16' | 'fp16' | 'fp32') for `device`; None means fp32."""
    precision = "fp32" if precision is None else str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "fp16"  # the project's AMP on CUDA, with a GradScaler
    if kind == "cpu" and CPU_BF16_MASKS_MATCH and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def autocast(device, precision: str):
    """torch.autocast for a resolved precision (disabled for fp32)."""
    kind = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type=kind, enabled=False)
    return torch.autocast(device_type=kind, dtype=DTYPES[precision])


def full_precision(device):
    """Leave any enclosing autocast: what runs inside stays float32."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def uses_grad_scaler(device, precision: str) -> bool:
    """A GradScaler is needed for float16 gradients on CUDA only."""
    return precision == "fp16" and torch.device(device).type == "cuda"


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_memory_format(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Put a module's 4D parameters in NHWC (in place; parameter objects are kept, so
    optimisers built earlier stay valid)."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def input_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A (B, C, H, W) batch in the networks' layout."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
