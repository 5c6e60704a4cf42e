"""`--profile FILE`: phases and top operators of ours' training step.
"""

from __future__ import annotations
from tools.benchmark.core import Settings, build_network, now, synchronize, synthetic_batch, time_calls
from tools.benchmark.training import BareStep, make_trainer


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
