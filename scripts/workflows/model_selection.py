"""Per-modality model selection: each network kept at the epoch of its own best validation DSC.

`models/model.pt` keeps all K networks at the epoch of the best *fused* validation DSC (MONAI's
key-metric CheckpointSaver), so a network whose own map peaks earlier or later is kept at
another epoch than its best (issue 34: CAM's FLAIR map peaks at epoch 3 and ends lower).
`PerModalityBestSaver` keeps, per modality, that network's weights from the validation at which
its own `val_dsc_<modality>` was highest, and writes them together as one plain state dict of
the same network (`models/model_per_modality.pt`, loadable wherever model.pt is: evaluation,
inference, model-zoo tools) with a JSON beside it naming each network's epoch and DSC.

Why not MONAI's CheckpointSaver: it saves whole objects at one engine state, one key metric per
saver; here each file mixes sub-networks from different epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scripts.common import atomic_torch_save, atomic_write_json

SELECTION_SUFFIX = ".selection.json"


def _network_prefixes(network: torch.nn.Module) -> dict[str, str]:
    """{modality: state-dict key prefix of its network} of a MultiModalCAM."""
    modalities = list(getattr(network, "modalities", []))
    if not modalities or not hasattr(network, "nets"):
        raise TypeError(f"per-modality selection needs a MultiModalCAM (with .modalities and .nets), "
                        f"got {type(network).__name__}")
    return {m: f"nets.{k}." for k, m in enumerate(modalities)}


class PerModalityBestSaver:
    """After each validation, keep every network whose own validation DSC improved; write the
    combination atomically when any did.

    Ties keep the earlier epoch (as MONAI's key-metric saver does). Checkpointed through
    `state_dict` / `load_state_dict` (listed in last.pt), so a resumed run continues the
    selection of the whole run.

    Args:
        save_dir: folder of the combined state dict (training's ckpt_dir).
        network: the network validation reads (a MultiModalCAM; with an EMA, the averaged one).
        filename: name of the combined state dict; the selection (epoch and DSC per network)
            goes beside it as `<stem>.selection.json`.
        enabled: false builds a handler that does nothing (the config switch).
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model_per_modality.pt",
                 enabled: bool = True):
        self.save_path = Path(save_dir) / filename
        self.selection_path = self.save_path.with_name(self.save_path.stem + SELECTION_SUFFIX)
        self.network = network
        self.enabled = bool(enabled)
        self.prefixes = _network_prefixes(network) if self.enabled else {}
        self.selection: dict[str, dict] = {}  # modality -> {"epoch": e, "dsc": d}
        self.kept: dict[str, torch.Tensor] = {}  # the combined state dict's network entries (CPU copies)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        improved = [m for m in self.prefixes
                    if f"val_dsc_{m}" in metrics
                    and float(metrics[f"val_dsc_{m}"]) > self.selection.get(m, {}).get("dsc", float("-inf"))]
        if not improved:
            return
        state = self.network.state_dict()
        for m in improved:
            prefix = self.prefixes[m]
            self.kept.update({k: v.detach().to("cpu", copy=True) for k, v in state.items() if k.startswith(prefix)})
            self.selection[m] = {"epoch": int(engine.state.epoch), "dsc": float(metrics[f"val_dsc_{m}"])}
        self.write(state)

    def write(self, current: dict) -> None:
        """The combined state dict: each selected network's kept weights; every other entry
        (networks not yet validated, the recorded settings) from `current`."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # every rank keeps the selection (identical replicas); rank 0 alone writes
        combined = {k: (self.kept[k] if k in self.kept else v.detach().to("cpu")) for k, v in current.items()}
        atomic_torch_save(combined, self.save_path)
        atomic_write_json(self.selection_path, {"selected_by": "val_dsc_<modality>", "networks": self.selection})

    def state_dict(self) -> dict:
        return {"selection": json.loads(json.dumps(self.selection)), "kept": dict(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.selection = {m: dict(v) for m, v in (state.get("selection") or {}).items()}
        self.kept = dict(state.get("kept") or {})
