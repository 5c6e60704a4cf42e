"""An exponential moving average (EMA) of the networks' weights, for validation and the saved model.

A short CPU-sized run at a high learning rate ends each epoch at a different point of a noisy
path: the fused DSC of one run swings by 5-20 points between neighbouring epochs
(docs/recipe.md), so "best epoch" is partly a draw. Validating and saving an average of the
recent weights instead smooths that path at no training cost. PyTorch's `AveragedModel` with
`get_ema_multi_avg_fn` does the averaging (BatchNorm statistics included, `use_buffers`);
this class adds what the bundle needs around it: an ignite handler that updates the average
after every optimiser step, the network that validation and `models/model.pt` read (the
average, or the trained network itself when the EMA is off), and a state for `last.pt` so
a resumed run continues the same average.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """EMA of `network`'s parameters and buffers, updated after every training iteration.

    Args:
        network: the trained network (a `MultiModalCAM`).
        decay: weight of the previous average at each update, in (0, 1) (0.99: the average
            spans about the last 100 iterations); None or 0 = off, and `network` is what
            validation and the saved model use.
    """

    def __init__(self, network: torch.nn.Module, decay: float | None = None):
        decay = float(decay) if decay else None
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null (off), got {decay}")
        self.decay = decay
        self.source = network
        self.averaged = (AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
                         if decay is not None else None)

    @property
    def network(self) -> torch.nn.Module:
        """The network to validate and save: the average when on, else the trained network."""
        return self.averaged.module if self.averaged is not None else self.source

    def attach(self, engine: Engine) -> None:
        if self.averaged is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def update(self, engine: Engine | None = None) -> None:
        """Fold the trained network's current weights into the average."""
        self.averaged.update_parameters(self.source)

    def state_dict(self) -> dict:
        return self.averaged.state_dict() if self.averaged is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.averaged is not None and state:
            self.averaged.load_state_dict(state)
