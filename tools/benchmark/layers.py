"""The benchmark's opt-in `layers` part: each convolution of one UNetCAM, forward and backward,
in NHWC (channels_last, the trainer's default on a CPU) and NCHW, side by side.

Why: on an AVX2-only CPU (AMD Zen 3) the profile of a training step showed the convolutions'
backward at 3.2x their forward time where the FLOPs are 2x (docs/performance.md, "Zen 3"). This
part says which layers are slow in which memory format, and what choosing the faster format per
layer could save at most (the sum of the per-layer minima; the reorders between formats are not
counted, so it is an upper bound).

Each layer is a fresh `torch.nn.Conv2d` of the network's shape fed the shape it sees in the
bare step (2B slices at the largest size, captured by forward hooks), timed with `time_calls`:
forward alone, then forward + backward (input gradient where the layer has one, weight and bias
gradients), backward = the difference. GFLOP/s counts 2 x MACs forward, twice that backward (once
for the first layer, which has no input gradient).
"""

from __future__ import annotations

from dataclasses import replace

import torch


def conv_shapes(s) -> list[tuple[str, torch.nn.Conv2d, tuple[int, ...]]]:
    """(name, layer, input shape) of every Conv2d of one UNetCAM on 2B slices of the largest size."""
    from tools.benchmark.core import build_network

    size = max(s.sizes)
    network = build_network(1, replace(s, channels_last=False))
    shapes: list = []
    hooks = [module.register_forward_hook(lambda m, inputs, _out, name=name: shapes.append((name, m, tuple(inputs[0].shape))))
             for name, module in network.named_modules() if isinstance(module, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            network.nets[0](torch.zeros(2 * s.batch_size, 1, size, size, device=s.device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _layer_seconds(layer: torch.nn.Conv2d, shape: tuple[int, ...], channels_last: bool, first: bool, s) -> tuple:
    from tools.benchmark.core import time_calls

    conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           bias=layer.bias is not None).to(s.device)
    x = torch.randn(shape, device=s.device)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(not first)
    grad = torch.randn_like(conv(x))

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        conv(x).backward(grad)

    forward_s = time_calls(forward, s)
    return forward_s, max(time_calls(forward_backward, s) - forward_s, 1e-9)


def layer_rows(s, progress=lambda message: None) -> list:
    """One row per convolution (NHWC vs NCHW, forward and backward), then the totals."""
    from tools.benchmark.core import Row

    rows, totals = [], {"nhwc": [0.0, 0.0], "nchw": [0.0, 0.0], "best": [0.0, 0.0]}
    for index, (name, layer, shape) in enumerate(conv_shapes(s)):
        first = index == 0
        macs = shape[0] * layer.in_channels * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1] \
            * shape[2] * shape[3] / (layer.stride[0] * layer.stride[1])
        forward_gflop = 2 * macs / 1e9
        backward_gflop = forward_gflop * (1 if first else 2)
        timing = {fmt: _layer_seconds(layer, shape, fmt == "nhwc", first, s) for fmt in ("nhwc", "nchw")}
        for fmt, (f, b) in timing.items():
            totals[fmt][0] += f
            totals[fmt][1] += b
        totals["best"][0] += min(t[0] for t in timing.values())
        totals["best"][1] += min(t[1] for t in timing.values())
        (nf, nb), (cf, cb) = timing["nhwc"], timing["nchw"]
        case = f"{name.split('.', 2)[-1]}: {layer.in_channels}->{layer.out_channels} at {shape[2]}x{shape[3]}, {shape[0]} slices"
        rows.append(Row("layers", case,
                        f"NHWC fwd {1e3 * nf:.1f} ms ({forward_gflop / nf:.0f} GFLOP/s), bwd {1e3 * nb:.1f} ms "
                        f"({backward_gflop / nb:.0f} GFLOP/s)",
                        f"NCHW fwd {1e3 * cf:.1f} ms ({forward_gflop / cf:.0f}), bwd {1e3 * cb:.1f} ms "
                        f"({backward_gflop / cb:.0f})", f"bwd/fwd NHWC {nb / nf:.1f}, NCHW {cb / cf:.1f}"))
        progress(f"  {case}: NHWC {1e3 * nf:.1f} + {1e3 * nb:.1f} ms, NCHW {1e3 * cf:.1f} + {1e3 * cb:.1f} ms")
    (nf, nb), (cf, cb), (bf, bb) = totals["nhwc"], totals["nchw"], totals["best"]
    rows.append(Row("layers", "all convolutions of one network, summed",
                    f"NHWC {1e3 * nf:.0f} + {1e3 * nb:.0f} ms (fwd + bwd)", f"NCHW {1e3 * cf:.0f} + {1e3 * cb:.0f} ms",
                    f"NCHW / NHWC {(cf + cb) / (nf + nb):.2f}"))
    rows.append(Row("layers", "the faster format per layer and pass (upper bound: reorders not counted)",
                    f"{1e3 * bf:.0f} + {1e3 * bb:.0f} ms", f"NHWC {1e3 * (nf + nb):.0f} ms",
                    f"{(bf + bb) / (nf + nb):.2f}x NHWC's time"))
    return rows
