"""Tests for scripts/model/networks.py: shapes, the CAM contract, normalisation, gating, TorchScript."""

from __future__ import annotations

import pytest
import torch

from scripts.model.cams import logits_from_maps, max_normalise
from scripts.model.networks import DeepLabCAM, MultiModalCAM, UNetCAM, build_network


def _count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def small_unet() -> UNetCAM:
    torch.manual_seed(0)
    return UNetCAM(in_channels=1, num_classes=2, base_channels=8).eval()


def test_unet_parameter_count_matches_authors_backbone():
    # The authors' network has about 3.4 M parameters at 64 base channels.
    count = _count_parameters(UNetCAM(base_channels=64))
    assert 3.3e6 < count < 3.5e6, count


def test_unet_widths_scale_with_base_channels():
    small, large = UNetCAM(base_channels=8), UNetCAM(base_channels=16)
    # Convolution weights grow with width squared, so doubling the base ~quadruples the count.
    assert 3.5 < _count_parameters(large) / _count_parameters(small) < 4.1


@pytest.mark.parametrize("size", [(32, 32), (30, 37), (17, 9)])
def test_unet_maps_and_features_at_input_resolution(small_unet, size):
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        maps, features = small_unet(x), small_unet.features(x)
    assert maps.shape == (2, 2, *size)
    assert features.shape == (2, 8, *size)
    assert features.min() >= 0  # ReLU'd head features


def test_unet_forward_is_bias_free_readout_of_features(small_unet):
    classifier = small_unet.classifier
    assert classifier.bias is None and classifier.kernel_size == (1, 1)
    x = torch.randn(2, 1, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(small_unet(x), classifier(small_unet.features(x)))
        # A CAM is a linear read-out: the tumour map is w_1 . features pixel-wise.
        manual = torch.einsum("bchw,c->bhw", small_unet.features(x), classifier.weight[1, :, 0, 0])
        torch.testing.assert_close(small_unet(x)[:, 1], manual, rtol=1e-5, atol=1e-5)


def test_unet_pads_to_multiple_of_8_and_crops_back(small_unet):
    # 29x30 is zero-padded to 32x32 (1 or 2 pixels per side); the maps must equal running
    # the net on that padded canvas and cropping the same window.
    x = torch.randn(1, 1, 29, 30)
    padded = torch.nn.functional.pad(x, [1, 1, 1, 2])
    with torch.no_grad():
        expected = small_unet(padded)[..., 1:30, 1:31]
        torch.testing.assert_close(small_unet(x), expected)


@pytest.mark.parametrize("size", [(29, 30), (17, 9), (80, 80)])
def test_unet_without_upcat_pad_matches_monai_default(small_unet, size):
    # UNetCAM builds UpCat with is_pad=False (a zero-width replicate pad costs a copy per
    # stage and blocks torch.compile): the same weights with MONAI's default is_pad=True
    # must give the same maps and gradients on any size, since `_pad_to_multiple` aligns
    # every skip connection.
    assert not any(m.is_pad for m in (small_unet.up1, small_unet.up2, small_unet.up3))
    padded = UNetCAM(in_channels=1, num_classes=2, base_channels=8).eval()
    padded.load_state_dict(small_unet.state_dict())
    for stage in (padded.up1, padded.up2, padded.up3):
        stage.is_pad = True
    x = torch.randn(2, 1, *size, requires_grad=True)
    x_padded = x.detach().clone().requires_grad_(True)
    ours, theirs = small_unet(x), padded(x_padded)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(x.grad, x_padded.grad, rtol=0, atol=0)


def test_unet_scripts_and_matches_eager(small_unet):
    scripted = torch.jit.script(small_unet)
    x = torch.randn(2, 1, 30, 27)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), small_unet(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted.features(x), small_unet.features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_contract_on_small_input(output_stride):
    torch.manual_seed(0)
    net = DeepLabCAM(base_channels=8, output_stride=output_stride).eval()
    x = torch.randn(2, 1, 33, 40)
    with torch.no_grad():
        encoded = net._encode(x)
        maps, features = net(x), net.features(x)
    # Dilation instead of striding keeps the encoder at 1/output_stride of the input.
    assert encoded.shape[-2:] == (-(-33 // output_stride), -(-40 // output_stride))
    assert encoded.shape[1] == 8 * 8 * 4  # ResNet-50 widths at base 8, bottleneck x4
    assert maps.shape == (2, 2, 33, 40)
    assert features.shape == (2, 8, 33, 40)
    assert net.classifier.bias is None
    torch.testing.assert_close(maps, net.classifier(features))


def test_deeplab_rejects_unknown_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabCAM(base_channels=8, output_stride=32)


def test_logits_are_global_average_of_maps():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 1, :2] = 4.0  # half the pixels at 4
    logits = logits_from_maps(maps)
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 2.0], [0.0, 0.0]]))


def test_max_normalise_known_values_per_sample_and_channel():
    maps = torch.zeros(2, 2, 1, 4)
    maps[0, 1, 0] = torch.tensor([-1.0, 1.0, 3.0, 5.0])  # relu -> [0, 1, 3, 5], min 0, max 5
    maps[1, 0, 0] = torch.tensor([2.0, 4.0, 4.0, 6.0])  # min 2, max 6
    normalised = max_normalise(maps)
    torch.testing.assert_close(normalised[0, 1, 0], torch.tensor([0.0, 0.2, 0.6, 1.0]))
    torch.testing.assert_close(normalised[1, 0, 0], torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert normalised[0, 0].abs().max() == 0 and normalised[1, 1].abs().max() == 0  # flat -> 0


def test_max_normalise_is_independent_across_samples():
    maps = torch.rand(3, 2, 5, 5)
    scaled = maps.clone()
    scaled[0] *= 100.0
    torch.testing.assert_close(max_normalise(scaled)[1:], max_normalise(maps)[1:])
    torch.testing.assert_close(max_normalise(scaled)[0], max_normalise(maps)[0], rtol=1e-4, atol=1e-6)


def test_build_network_by_name():
    assert isinstance(build_network("unet", base_channels=8), UNetCAM)
    assert isinstance(build_network("deeplab", base_channels=8, output_stride=8), DeepLabCAM)
    with pytest.raises(ValueError, match="backbone"):
        build_network("vit")


def _manual_tumour_cams(model: MultiModalCAM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ungated normalised tumour maps (B, K, H, W) and tumour probabilities (B, K)."""
    cams, probabilities = [], []
    for index, net in enumerate(model.nets):
        maps = net(x[:, index : index + 1])
        cams.append(max_normalise(maps)[:, 1])
        probabilities.append(torch.softmax(logits_from_maps(maps), dim=1)[:, 1])
    return torch.stack(cams, 1), torch.stack(probabilities, 1)


@pytest.fixture(scope="module")
def two_modality_model() -> MultiModalCAM:
    torch.manual_seed(1)
    model = MultiModalCAM(["t1", "flair"], base_channels=8, gate=False).eval()
    with torch.no_grad():
        for net in model.nets:
            # Non-negative tumour read-out of the ReLU'd features: the tumour maps are
            # positive somewhere, so a zero output can only come from the gate.
            net.classifier.weight[1].abs_()
    return model


def test_multimodal_runs_each_modality_through_its_own_net(two_modality_model):
    model = two_modality_model
    assert len(model.nets) == 2 and model.modalities == ["t1", "flair"]
    x = torch.randn(2, 2, 24, 24)
    with torch.no_grad():
        cams = model(x)
        expected, _ = _manual_tumour_cams(model, x)
    assert cams.shape == (2, 2, 24, 24)
    torch.testing.assert_close(cams, expected)
    # Swapping the modality channels must change the output (nets are not shared).
    with torch.no_grad():
        assert not torch.allclose(model(x.flip(1)), cams.flip(1), atol=1e-4)


def test_multimodal_gate_zeroes_slices_below_threshold(two_modality_model):
    model = two_modality_model
    x = torch.randn(2, 2, 24, 24)
    with torch.no_grad():
        ungated, probabilities = _manual_tumour_cams(model, x)
        # Threshold between the two samples' probabilities of modality 0.
        low, high = sorted(probabilities[:, 0].tolist())
        assert low < high
        model.gate, model.gate_threshold = True, (low + high) / 2
        try:
            gated = model(x)
        finally:
            model.gate, model.gate_threshold = False, 0.5
    kept = probabilities[:, 0] >= (low + high) / 2
    assert kept.sum() == 1
    torch.testing.assert_close(gated[kept, 0], ungated[kept, 0])
    assert gated[~kept, 0].abs().max() == 0
    assert ungated[~kept, 0].abs().max() > 0  # the gate, not the map, made it zero


def test_mean_gate_source_opens_every_map_on_the_networks_mean_probability(two_modality_model):
    """gate_source "mean": a slice keeps all its maps when the mean of the networks' probabilities is above
    the threshold, and none otherwise, whatever a single network says (eager and scripted alike)."""
    model = two_modality_model
    torch.manual_seed(3)
    x = torch.randn(6, 2, 24, 24)
    with torch.no_grad():
        ungated, probabilities = _manual_tumour_cams(model, x)
        mean = probabilities.mean(dim=1)
        threshold = float(mean.median())
        model.gate, model.gate_threshold, model.gate_source = True, threshold, "mean"
        try:
            gated, scripted = model(x), torch.jit.script(model)(x)
        finally:
            model.gate, model.gate_threshold, model.gate_source = False, 0.5, "own"
    kept = mean > threshold
    assert 0 < int(kept.sum()) < len(kept)
    assert ((probabilities > threshold) != kept[:, None]).any()  # some network alone would have decided otherwise
    torch.testing.assert_close(gated[kept], ungated[kept])
    assert gated[~kept].abs().max() == 0 and ungated[~kept].abs().max() > 0
    torch.testing.assert_close(scripted, gated, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gate_source"):
        MultiModalCAM(["t1"], base_channels=4, gate_source="vote")


def test_multimodal_scripts_and_matches_eager():
    torch.manual_seed(2)
    model = MultiModalCAM(["t1", "t1c", "t2"], base_channels=8, gate=True, gate_threshold=0.3).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)
    assert eager.shape == (2, 3, 20, 28)


def test_multimodal_rejects_wrong_channel_count(two_modality_model):
    with pytest.raises(ValueError, match="modality channels"):
        two_modality_model(torch.randn(1, 3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_multimodal_on_gpu_matches_cpu():
    torch.manual_seed(3)
    model = MultiModalCAM(["t1", "t2"], base_channels=8, gate=False).eval()
    x = torch.randn(2, 2, 30, 30)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = model.cuda()(x.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
