"""The benchmark's `precision` part: the matmul peak of this machine and the bare UNetCAM
step's share of it, per precision (used by `python -m tools.benchmark`).

Rows: 2048x2048 matmul GFLOP/s in float32 and bfloat16 (the peak the networks could reach;
bfloat16 is marked "emulated" on a CPU without native bf16), then for every slice size and
precision the bare step of one UNetCAM (forward + backward over 2B slices, as `BareStep`) as
FLOPs / time, against the matmul rate of its own precision (issue 32: >= 25 %), and the FLOPs
of a whole training step (K networks, both views). FLOPs are counted
once by `torch.utils.flop_counter.FlopCounterMode` (convolutions and matmuls, forward and
backward; element-wise work is not counted, so the share is a lower bound of the work done).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

MIN_PEAK_SHARE = 0.25  # issue 32: the bare step at >= 25 % of the matmul rate in its own precision
MATMUL_N = 2048


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 5, n: int = MATMUL_N) -> float:
    from tools.benchmark.core import median, timed

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN primitive creation
    seconds = median([timed(lambda: torch.mm(a, b), device) for _ in range(repeats)])
    return 2 * n**3 / seconds / 1e9


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def precision_rows(s, progress=lambda message: None) -> list:
    from tools.benchmark.core import Row, build_network, synthetic_batch, time_calls, verdict
    from tools.benchmark.training import BareStep

    from scripts.precision import cpu_supports_bf16

    repeats = 2 if s.quick else 5
    peak = {name: matmul_gflops(dtype, s.device, repeats) for name, dtype in
            (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    native_bf16 = s.device.type != "cpu" or cpu_supports_bf16()
    rows = [Row("precision", f"matmul {MATMUL_N}x{MATMUL_N}, fp32", f"{peak['fp32']:.0f} GFLOP/s"),
            Row("precision", f"matmul {MATMUL_N}x{MATMUL_N}, bf16{'' if native_bf16 else ' (emulated: no native bf16)'}",
                f"{peak['bf16']:.1f} GFLOP/s", f"fp32 {peak['fp32']:.0f} GFLOP/s", f"{peak['bf16'] / peak['fp32']:.2f}x")]
    progress(f"  matmul fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.1f} GFLOP/s")
    for size in s.sizes:
        batch = synthetic_batch(s.batch_size, 1, size)
        flops = step_flops(BareStep(build_network(1, replace(s, precision="fp32")), batch, s))
        k = max(s.ks)
        rows.append(Row("precision", f"FLOPs of a training step, K={k}, {size}x{size}, B={s.batch_size} ([x; pi(x)]: "
                        f"2B slices per network), base {s.base_channels}", f"{k * flops / 1e9:.1f} GFLOP",
                        f"one network {flops / 1e9:.1f} GFLOP (forward + backward, convolutions and matmuls)"))
        for precision in s.precisions:
            sp = replace(s, precision=precision, amp=precision != "fp32")
            seconds = time_calls(BareStep(build_network(1, sp), batch, sp), sp)
            rate = flops / seconds / 1e9
            reference = "bf16" if precision in ("bf16", "fp16") else "fp32"
            share = rate / peak[reference]
            case = (f"bare UNetCAM step, K=1, {size}x{size}, 2B={2 * s.batch_size} slices, base {s.base_channels}, "
                    f"{precision}{', channels_last' if s.channels_last else ''}")
            rows.append(Row("precision", case, f"{rate:.0f} GFLOP/s ({flops / 1e9:.1f} GFLOP in {seconds:.3f} s)",
                            f"{reference} matmul {peak[reference]:.0f} GFLOP/s", f"{100 * share:.0f} %",
                            f">= {100 * MIN_PEAK_SHARE:.0f} %", verdict(share >= MIN_PEAK_SHARE)))
            progress(f"  {case}: {rate:.0f} GFLOP/s, {100 * share:.0f} % of the {reference} peak")
    return rows
