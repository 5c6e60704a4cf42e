"""Tests of scripts.model.cams on tiny stand-in networks with the scripts.model.networks contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.visualize import GradCAMpp

from scripts.workflows.map_engine import volume_maps
from scripts.model.cams import (
    augmented_maps,
    binarise,
    cam_maps,
    fuse_maps,
    gate_maps,
    gradcampp_maps,
    max_normalise,
    slice_probabilities,
)

torch.set_num_threads(1)


class TinyCAM(nn.Module):
    """Stand-in UNetCAM: 3x3 conv backbone with BatchNorm and dropout, bias-free 1x1 head."""

    def __init__(self, seed: int = 0, hidden: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Dropout2d(0.5),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(hidden, 2, 1, bias=False)
        # Non-trivial running statistics so that train-mode BatchNorm would give other values.
        self.backbone[1].running_mean.uniform_(-0.5, 0.5)
        self.backbone[1].running_var.uniform_(0.5, 2.0)

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.classifier(self.features(x))


class CoarseCAM(TinyCAM):
    """Features at half resolution and a non-linear head: gradients vary in space and the
    GradCAM++ map must be upsampled (exercises the general formula, beyond the contract)."""

    def __init__(self, seed: int = 1, hidden: int = 4):
        super().__init__(seed, hidden)
        self.backbone[4] = nn.Conv2d(hidden, hidden, 3, padding=1, stride=2)
        self.classifier = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, 2, 1, bias=False)
        )


class PointwiseCAM(nn.Module):
    """1x1 convolutions only: exactly equivariant to flips and rotations."""

    def __init__(self, seed: int = 2, hidden: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(1, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU())
        self.classifier = nn.Conv2d(hidden, 2, 1, bias=False)

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.classifier(self.features(x))


class TwoModalityModel(nn.Module):
    """MultiModalCAM-like holder: `modalities` and `nets`."""

    def __init__(self, nets: dict):
        super().__init__()
        self.modalities = list(nets)
        self.nets = nn.ModuleList(nets.values())


def slices(batch=3, height=12, width=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, height, width, generator=generator)


class LogitsOf(nn.Module):
    """What MONAI's CAM tools expect: forward -> logits (GAP of the maps)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).mean(dim=(-2, -1))


def monai_gradcampp(net, x):
    """MONAI's GradCAM++ (raw, no normaliser) one sample at a time, on a copy of the net
    (MONAI registers hooks permanently and overwrites parameter gradients)."""
    wrapped = LogitsOf(copy.deepcopy(net)).eval()
    cam = GradCAMpp(wrapped, target_layers="net.backbone", postprocessing=lambda m: m)
    return torch.cat([cam(x[i : i + 1], class_idx=1)[:, 0] for i in range(x.shape[0])])


# ---------------------------------------------------------------------------------------


def test_normaliser_matches_authors_formula():
    maps = torch.tensor([[[-1.0, 0.5], [2.0, 1.0]], [[3.0, 3.0], [3.0, 3.0]]])
    out = max_normalise(maps)
    p = torch.relu(maps[0])
    expected = torch.relu(p - p.min() - 1e-8) / (p.max() - p.min() + 1e-8)
    torch.testing.assert_close(out[0], expected)
    assert torch.all(out[1] == 0)  # a constant map normalises to zero, not NaN


def test_cam_maps_range_and_equals_tumour_channel():
    net = TinyCAM()
    x = slices()
    out = cam_maps(net, x)
    assert out.shape == (3, 12, 10)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with torch.no_grad():
        raw = net.eval()(x)[:, 1]
    torch.testing.assert_close(out, max_normalise(raw))
    # Slices with a positive tumour response reach ~1; an all-negative one stays all zero.
    positive = torch.relu(raw).amax(dim=(1, 2)) > 0
    assert positive.any()
    peaks = out.amax(dim=(1, 2))
    assert torch.all(peaks[positive] > 0.99) and torch.all(peaks[~positive] == 0)


def test_cam_maps_batches_and_mode_restored():
    net = TinyCAM().train()
    net.backbone[1].eval()  # a submodule's own flag must survive too
    x = slices(batch=5)
    whole = cam_maps(net, x, batch_size=None)
    chunked = cam_maps(net, x, batch_size=2)
    torch.testing.assert_close(whole, chunked)  # also proves dropout was off
    assert net.training and not net.backbone[1].training and net.backbone[3].training


def test_wrapped_network_is_unwrapped():
    net = TinyCAM()
    x = slices()
    torch.testing.assert_close(gradcampp_maps(nn.DataParallel(net), x), gradcampp_maps(net, x))


def test_slice_probabilities_is_softmax_of_gap():
    net = TinyCAM()
    x = slices()
    probs = slice_probabilities(net, x)
    with torch.no_grad():
        logits = net.eval()(x).mean(dim=(2, 3))
    torch.testing.assert_close(probs, torch.softmax(logits, 1)[:, 1])


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("net_class", [TinyCAM, CoarseCAM])
def test_gradcampp_matches_monai_at_batch_one(net_class):
    net = net_class()
    x = slices(batch=2)
    ours = gradcampp_maps(net, x)
    theirs = max_normalise(monai_gradcampp(net, x))
    assert ours.shape == (2, 12, 10)
    assert float(ours.max()) > 0.5  # not a trivially empty map
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_gradcampp_batched_equals_per_sample():
    net = CoarseCAM()
    x = slices(batch=4)
    batched = gradcampp_maps(net, x, batch_size=None)
    single = torch.cat([gradcampp_maps(net, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_gradcampp_leaves_gradients_and_mode_alone():
    net = TinyCAM().train()
    sentinel = {name: torch.full_like(p, 7.0) for name, p in net.named_parameters()}
    for name, p in net.named_parameters():
        p.grad = sentinel[name].clone()
    gradcampp_maps(net, slices())
    assert net.training and all(m.training for m in net.modules())
    for name, p in net.named_parameters():
        assert torch.equal(p.grad, sentinel[name]), name
    fresh = TinyCAM()
    gradcampp_maps(fresh, slices())
    assert all(p.grad is None for p in fresh.parameters())


def test_gate_fuse_binarise():
    maps = torch.rand(3, 4, 4) + 0.1
    gated = gate_maps(maps, torch.tensor([0.9, 0.5, 0.2]))
    assert torch.equal(gated[0], maps[0]) and gated[1:].abs().sum() == 0
    gated = gate_maps(maps, torch.tensor([0.1, 0.7, 0.7]), threshold=0.6)
    assert gated[0].sum() == 0 and torch.equal(gated[1:], maps[1:])

    stack = torch.stack([torch.zeros(2, 2), torch.tensor([[0.2, 0.8], [0.4, 0.0]])])[None]
    torch.testing.assert_close(fuse_maps(stack, "max")[0], torch.tensor([[0.2, 0.8], [0.4, 0.0]]))
    torch.testing.assert_close(fuse_maps(stack, "mean")[0], torch.tensor([[0.1, 0.4], [0.2, 0.0]]))
    assert np.allclose(fuse_maps(stack.numpy(), "max"), fuse_maps(stack, "max").numpy())
    with pytest.raises(ValueError):
        fuse_maps(stack, "min")

    values = torch.tensor([0.0, 0.5, 0.50001, 1.0])
    assert binarise(values).tolist() == [False, False, True, True]
    assert binarise(values, 0.0).tolist() == [False, True, True, True]


@pytest.mark.parametrize("tta", ["flips", "flips_rot90"])
@pytest.mark.parametrize("method", ["cam", "gradcampp"])
def test_tta_is_identity_for_equivariant_net(tta, method):
    net = PointwiseCAM()
    x = slices(batch=2, height=8, width=6)  # non-square: rot90 views change the shape
    plain_maps, plain_probs = augmented_maps(net, x, method, None)
    tta_maps, tta_probs = augmented_maps(net, x, method, tta)
    assert tta_maps.shape == (2, 8, 6)
    torch.testing.assert_close(tta_maps, plain_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(tta_probs, plain_probs, atol=1e-6, rtol=0)


def test_tta_changes_maps_of_a_non_equivariant_net():
    net = TinyCAM()
    x = slices(batch=2, height=8, width=6)
    plain, _ = augmented_maps(net, x, "cam", None)
    flipped, _ = augmented_maps(net, x, "cam", "flips")
    assert float((plain - flipped).abs().max()) > 1e-3
    with pytest.raises(ValueError):
        augmented_maps(net, x, "cam", "rot45")


def _expected_volume_maps(net, volume_channel, method, gate):
    x = volume_channel.permute(2, 0, 1)[:, None]  # (D,1,H,W)
    maps = cam_maps(net, x) if method == "cam" else gradcampp_maps(net, x)
    if gate:
        maps = gate_maps(maps, slice_probabilities(net, x))
    return maps.permute(1, 2, 0)


@pytest.mark.parametrize("method", ["cam", "gradcampp"])
@pytest.mark.parametrize("gate", [True, False])
def test_volume_maps_stacks_slices_in_order(method, gate):
    nets = {"t1": TinyCAM(seed=3), "flair": TinyCAM(seed=4)}
    volume = torch.randn(2, 12, 10, 5, generator=torch.Generator().manual_seed(5))
    out = volume_maps(nets, volume, method=method, batch_size=2, gate=gate)
    assert list(out) == ["t1", "flair"]
    for k, (name, net) in enumerate(nets.items()):
        assert out[name].shape == (12, 10, 5)
        torch.testing.assert_close(out[name], _expected_volume_maps(net, volume[k], method, gate), atol=1e-6, rtol=0)


def test_volume_maps_gates_some_slices():
    net = TinyCAM(seed=3)
    volume = torch.randn(1, 12, 10, 6, generator=torch.Generator().manual_seed(6))
    probs = slice_probabilities(net, volume[0].permute(2, 0, 1)[:, None])
    threshold = float(probs.median())  # some slices above, some not
    out = volume_maps({"t2": net}, volume, gate=True, gate_threshold=threshold)["t2"]
    kept = out.abs().sum(dim=(0, 1)) > 0
    assert torch.equal(kept, probs > threshold)


def test_volume_maps_accepts_multimodal_model_and_channel_names():
    nets = {"t1c": TinyCAM(seed=3), "t2": TinyCAM(seed=4)}
    model = TwoModalityModel(nets)
    volume = torch.randn(4, 8, 8, 3, generator=torch.Generator().manual_seed(7))  # MODALITIES order
    out = volume_maps(model, volume, gate=False)
    torch.testing.assert_close(out["t1c"], _expected_volume_maps(nets["t1c"], volume[1], "cam", False))
    torch.testing.assert_close(out["t2"], _expected_volume_maps(nets["t2"], volume[2], "cam", False))
    swapped = volume_maps(nets, volume[[2, 1]], gate=False, channels=["t2", "t1c"])
    torch.testing.assert_close(swapped["t1c"], out["t1c"])
    with pytest.raises(ValueError):
        volume_maps(nets, volume[:3], gate=False)
