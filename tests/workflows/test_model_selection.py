"""Per-modality model selection: each network kept at the epoch of its own best validation DSC."""

import json
from types import SimpleNamespace

import pytest
import torch

from scripts.model.networks import MultiModalCAM
from scripts.workflows.model_selection import PerModalityBestSaver


def _network():
    return MultiModalCAM(["t1", "flair"], backbone="unet", base_channels=4)


def _validate(saver, network, epoch, t1, flair):
    """One validation: every weight set to the epoch number, then the handler sees the metrics."""
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(float(epoch))
    engine = SimpleNamespace(state=SimpleNamespace(epoch=epoch, metrics={
        "val_dsc_t1": t1, "val_dsc_flair": flair, "val_dsc_fused": (t1 + flair) / 2}))
    saver(engine)


def _epoch_of(state, index):
    return {float(v.flatten()[0]) for k, v in state.items() if k.startswith(f"nets.{index}.") and v.is_floating_point()
            and "running" not in k and "num_batches" not in k}


def test_each_network_is_kept_at_its_own_best_epoch_and_loads_as_the_model(tmp_path):
    network = _network()
    saver = PerModalityBestSaver(str(tmp_path), network)
    _validate(saver, network, 1, t1=0.30, flair=0.20)
    _validate(saver, network, 2, t1=0.10, flair=0.50)  # FLAIR improves, T1 does not
    _validate(saver, network, 3, t1=0.30, flair=0.40)  # a tie for T1 keeps the earlier epoch
    state = torch.load(tmp_path / "model_per_modality.pt", weights_only=True)
    assert _epoch_of(state, 0) == {1.0} and _epoch_of(state, 1) == {2.0}
    selection = json.loads((tmp_path / "model_per_modality.selection.json").read_text())["networks"]
    assert selection == {"t1": {"epoch": 1, "dsc": 0.30}, "flair": {"epoch": 2, "dsc": 0.50}}
    fresh = _network()
    fresh.load_state_dict(state)  # a plain state dict of the same network: inference and evaluation load it
    assert float(fresh.nets[1].state_dict()[next(k for k in fresh.nets[1].state_dict() if k.endswith("weight"))]
                 .flatten()[0]) == 2.0


def test_a_resumed_selection_continues_the_whole_run(tmp_path):
    network = _network()
    saver = PerModalityBestSaver(str(tmp_path), network)
    _validate(saver, network, 1, t1=0.40, flair=0.20)
    resumed = PerModalityBestSaver(str(tmp_path), network)
    resumed.load_state_dict(saver.state_dict())
    _validate(resumed, network, 2, t1=0.35, flair=0.30)  # below the first run's T1: epoch 1 stays
    state = torch.load(tmp_path / "model_per_modality.pt", weights_only=True)
    assert _epoch_of(state, 0) == {1.0} and _epoch_of(state, 1) == {2.0}


def test_disabled_writes_nothing(tmp_path):
    network = _network()
    saver = PerModalityBestSaver(str(tmp_path), network, enabled=False)
    events = []
    saver.attach(SimpleNamespace(add_event_handler=lambda *a: events.append(a)))
    assert events == [] and not list(tmp_path.iterdir())


def test_a_network_without_modalities_is_refused(tmp_path):
    with pytest.raises(TypeError, match="MultiModalCAM"):
        PerModalityBestSaver(str(tmp_path), torch.nn.Linear(2, 2))
