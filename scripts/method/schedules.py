"""Schedules over the run: the learning rate of the K modality optimisers (warm-up, then
constant or cosine) and the method's lambda_E(t) weight of the equivariance terms.

The paper trains at a constant learning rate; a CPU-sized run makes ~100x fewer steps, and
a short linear warm-up followed by a cosine decay makes its last epochs stable (measured
in docs/training_recipe.md). MONAI's LrScheduleHandler drives one torch scheduler; here
one schedule drives all K optimisers and is derived from the engine's iteration count, so
a resumed run continues on the same curve without extra checkpoint state.
"""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

from scripts.method.losses import lambda_e

DECAYS = ("constant", "cosine")


def lr_factor(progress: float, warmup_fraction: float, decay: str = "constant", min_ratio: float = 0.0,
              warmup_start_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at `progress` in [0, 1] of the run.

    Linear warm-up from `warmup_start_ratio` over the first `warmup_fraction` of the run,
    then constant or a cosine from 1 down to `min_ratio` at the end."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * progress / warmup_fraction
    if decay == "constant":
        return 1.0
    rest = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-12)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * rest))


class ModalityLRSchedule:
    """Sets the learning rate of every modality optimiser before each iteration.

    Args:
        optimizers: a `scripts.method.trainer.ModalityOptimizers` (its `.optimizers` list is driven).
        lr: base learning rate (the config's `lr`).
        warmup_epochs: length of the linear warm-up, in epochs (0 = none).
        decay: "constant" (the paper) or "cosine" (down to `min_lr_ratio * lr` at the last iteration).
        min_lr_ratio: final learning rate of the cosine, as a fraction of `lr`.
        warmup_start_ratio: first learning rate of the warm-up, as a fraction of `lr`.
    """

    def __init__(self, optimizers, lr: float, warmup_epochs: float = 0.0, decay: str = "constant",
                 min_lr_ratio: float = 0.0, warmup_start_ratio: float = 0.1):
        if decay not in DECAYS:
            raise ValueError(f"lr_schedule decay must be one of {DECAYS}, got {decay!r}")
        if warmup_epochs < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"warmup_epochs must be >= 0 and min_lr_ratio in [0, 1] "
                             f"(got {warmup_epochs}, {min_lr_ratio})")
        self.optimizers = optimizers
        self.lr = float(lr)
        self.warmup_epochs = float(warmup_epochs)
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup_start_ratio = float(warmup_start_ratio)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def current_lr(self, engine: Engine) -> float:
        total = max(engine.state.max_epochs * engine.state.epoch_length, 1)
        progress = (engine.state.iteration - 1) / max(total - 1, 1)
        warmup_fraction = min(self.warmup_epochs / max(engine.state.max_epochs, 1), 1.0)
        return self.lr * lr_factor(progress, warmup_fraction, self.decay, self.min_lr_ratio, self.warmup_start_ratio)

    def __call__(self, engine: Engine) -> None:
        lr = self.current_lr(engine)
        for optimizer in self.optimizers.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        engine.state.metrics["lr"] = lr


class LambdaEScheduler:
    """Set `engine.lambda_e` from the configured schedule at every epoch start (1-based t).

    Args:
        schedule: paper | sigmoid | polynomial | constant (scripts.method.losses.lambda_e).
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
