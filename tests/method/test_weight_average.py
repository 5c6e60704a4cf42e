import pytest
import torch
from ignite.engine import Engine

from scripts.method.weight_average import WeightEMA
from scripts.model.networks import MultiModalCAM


def _net(seed=0):
    torch.manual_seed(seed)
    return MultiModalCAM(["t1", "flair"], base_channels=4)


def test_off_validates_the_trained_network_itself():
    net = _net()
    ema = WeightEMA(net, None)
    assert ema.network is net and ema.state_dict() == {}
    ema.load_state_dict({})  # a checkpoint of a run without EMA


def test_average_follows_the_ema_formula_and_keeps_the_models_contract():
    net = _net()
    ema = WeightEMA(net, 0.9)
    first = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    engine = Engine(lambda e, b: None)
    ema.attach(engine)
    engine.run([0, 1], max_epochs=1)  # two iterations, two updates
    # AveragedModel copies the weights on its first update, then averages: 0.9 * old + 0.1 * new
    name, start = next((k, v) for k, v in first.items() if k.endswith("classifier.weight"))
    averaged = ema.network.state_dict()[name]
    assert torch.allclose(averaged, start + 1.0, atol=1e-6)
    # the averaged network is a MultiModalCAM with the same settings: models/model.pt loads into one
    assert type(ema.network) is MultiModalCAM and ema.network is not net
    fresh = _net(1)
    fresh.load_state_dict(ema.network.state_dict())
    assert torch.equal(fresh.state_dict()[name], averaged)


def test_average_lags_behind_moving_weights_and_resumes_exactly():
    net = _net()
    ema = WeightEMA(net, 0.5)
    weight = net.nets[0].classifier.weight
    for step in range(3):  # weights 0, 1, 2 at the three updates
        with torch.no_grad():
            weight.fill_(float(step))
        ema.update()
    # copy 0 -> 0.5*0 + 0.5*1 = 0.5 -> 0.5*0.5 + 0.5*2 = 1.25
    assert torch.allclose(ema.network.nets[0].classifier.weight, torch.full_like(weight, 1.25))
    restored = WeightEMA(_net(3), 0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.network.nets[0].classifier.weight, ema.network.nets[0].classifier.weight)


def test_decay_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(_net(), 1.5)
