"""CAM pooling (gap | topk): one setting shared by the objective, the model's gate and the map engine."""

import pytest
import torch

from scripts.method.trainer import CMERTrainer, ModalityOptimizers, TransformSampler, build_objective
from scripts.model.cams import logits_from_maps, parse_pooling, pooling_of, pooling_spec, slice_probabilities
from scripts.model.networks import ModelSettings, MultiModalCAM, SettingsMismatch

torch.set_num_threads(1)


def test_topk_pooling_hand_value_and_gap_is_the_mean():
    maps = torch.zeros(1, 2, 4, 5)  # 20 pixels: top 10 % = the 2 largest
    maps[0, 1].view(-1)[:4] = torch.tensor([5.0, 3.0, 1.0, -2.0])
    topk = logits_from_maps(maps, "topk", 0.1)
    assert topk[0, 1].item() == pytest.approx(4.0) and topk[0, 0].item() == 0.0
    assert logits_from_maps(maps)[0, 1].item() == pytest.approx(7.0 / 20)
    assert logits_from_maps(maps, "topk", 1e-6)[0, 1].item() == 5.0  # at least one pixel: max pooling
    # an inverted map (high everywhere but on a small blob) scores like a localised one under GAP only
    blob, inverted = torch.zeros(1, 2, 10, 10), torch.ones(1, 2, 10, 10)
    blob[0, 1, :3, :3] = 10.0
    inverted[0, 1, :3, :3] = 0.0
    inverted[0, 0] = 0.0
    assert logits_from_maps(inverted)[0, 1] > logits_from_maps(blob)[0, 1] * 0.9
    assert logits_from_maps(blob, "topk", 0.05)[0, 1] == 10.0 > logits_from_maps(inverted, "topk", 0.05)[0, 1]


def test_pooling_spec_round_trip_and_errors():
    assert pooling_spec("gap", 0.3) == "gap" and parse_pooling(None) == ("gap", 1.0)
    assert pooling_spec("topk", 0.01) == "topk:0.01" and parse_pooling("topk:0.01") == ("topk", 0.01)
    for bad in (("max", 0.1), ("topk", 0.0), ("topk", 1.5)):
        with pytest.raises(ValueError):
            pooling_spec(*bad)
    with pytest.raises(ValueError, match="CAM pooling"):
        parse_pooling("lse:5")


def test_model_records_its_pooling_and_the_gate_and_map_engine_use_it():
    torch.manual_seed(0)
    trained = MultiModalCAM(["t1", "flair"], base_channels=4, pooling="topk:0.05")
    state = trained.state_dict()
    loaded = MultiModalCAM(["t1", "flair"], base_channels=4)  # pooling not given: the checkpoint's
    loaded.load_state_dict(state)
    assert loaded.settings.pooling == "topk:0.05" and pooling_of(loaded.nets[1]) == ("topk", 0.05)
    x = torch.randn(3, 1, 16, 16)
    net = loaded.nets[0].eval()
    with torch.no_grad():
        expected = torch.softmax(logits_from_maps(net(x), "topk", 0.05), 1)[:, 1]
    torch.testing.assert_close(slice_probabilities(net, x), expected)
    with pytest.raises(SettingsMismatch, match="pooling"):
        MultiModalCAM(["t1", "flair"], base_channels=4, pooling="gap").load_state_dict(state)


def test_settings_recorded_before_pooling_mean_gap():
    older = {"modalities": ["t1"], "backbone": "unet", "base_channels": 4}
    assert ModelSettings.from_state(older).pooling == "gap"
    assert ModelSettings.from_state(None).pooling is None


def test_trainer_refuses_an_objective_pooled_unlike_the_network():
    network = MultiModalCAM(["t1", "flair"], base_channels=4, pooling="topk:0.05")
    loader = [{"image": torch.randn(2, 2, 16, 16), "label": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match="pools the maps"):
        CMERTrainer(torch.device("cpu"), 1, loader, network, ModalityOptimizers(network, lr=1e-3),
                    build_objective("weak", None, "gap"), TransformSampler(("flip",), seed=0), precision="fp32")
    trainer = CMERTrainer(torch.device("cpu"), 1, loader, network, ModalityOptimizers(network, lr=1e-3),
                          build_objective("weak", None, "topk:0.05"), TransformSampler(("flip",), seed=0),
                          precision="fp32")
    assert trainer.pooling == ("topk", 0.05)
