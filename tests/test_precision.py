"""bfloat16 autocast against float32: losses, gradients and maps on the same batch; the
precision switch and its CPU detection; determinism by seed within each precision.

Parity is checked on a tiny UNetCAM pair trained for a few float32 steps first: at random
initialisation the gradients are mostly cancelling noise and bf16 / fp32 cosine similarity
is 0.87-0.98 (docs/performance.md); after 10 steps it is >= 0.998.
"""

import pytest
import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents

from scripts import precision as P
from scripts.model.cams import cam_maps, gradcampp_maps
from scripts.model.networks import MultiModalCAM
from scripts.method.trainer import CMERTrainer, ModalityOptimizers, TransformSampler, build_objective, loss_scalars

torch.set_num_threads(1)
SIZE, BATCH, BASE = 32, 8, 8
LOSS_RTOL = 0.02  # relative, per logged term (bf16 has 8 significant bits; measured <= 0.009)
# Per network. Measured 0.997-0.9997 on a CPU with native bf16 (AVX512-BF16 / AMX), where
# `precision: auto` uses it; 0.986 on an AVX2-only CPU (AMD EPYC), where oneDNN emulates the
# bf16 channels-last convolutions (auto picks fp32 there; bf16 is only used when forced).
GRAD_COSINE = 0.99 if P.cpu_supports_bf16() else 0.98
MAP_ATOL = 0.1  # max-normalised maps in [0, 1], worst pixel (measured 0.03-0.05)
MAP_MEAN_ATOL = 0.005  # mean over pixels (measured 1e-4 - 6e-4)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, 2, SIZE, SIZE, generator=g) * 0.3
    label = torch.arange(BATCH) % 2
    image[label == 1, :, 8:20, 10:22] += 1.5
    return {"image": image, "label": label}


def _trainer(network, batches, precision, kinds=("rotation",), seed=0, epochs=1, **kwargs):
    return CMERTrainer(torch.device("cpu"), epochs, batches, network, ModalityOptimizers(network, lr=1e-3),
                       build_objective("weak", None), TransformSampler(kinds, seed=seed), precision=precision,
                       **kwargs)


@pytest.fixture(scope="module")
def warm_state():
    """A network pair after 10 float32 steps (see the module docstring)."""
    torch.manual_seed(0)
    network = MultiModalCAM(["t1", "t2"], base_channels=BASE)
    _trainer(network, [_batch(1)], "fp32", kinds=("flip", "rotation", "scale", "translation"), epochs=10).run()
    return {k: v.clone() for k, v in network.state_dict().items()}


def _one_step(state, precision, kind="rotation", **kwargs):
    network = MultiModalCAM(["t1", "t2"], base_channels=BASE)
    network.load_state_dict(state)
    trainer = _trainer(network, [_batch(2)], precision, kinds=(kind,), **kwargs)
    grads = {}

    def keep(_):
        for k, net in enumerate(network.nets):
            grads[k] = torch.cat([p.grad.flatten().float() for p in net.parameters()])

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, keep)
    trainer.run()
    return trainer, loss_scalars(trainer.state.output), grads


def _terms(output):
    return {k: v for k, v in output.items() if k != "lambda_e"}


@pytest.mark.parametrize("kind", ["flip", "rotation", "scale", "translation"])
def test_bf16_step_matches_fp32_losses_and_gradients(warm_state, kind):
    _, out32, g32 = _one_step(warm_state, "fp32", kind)
    trainer, out16, g16 = _one_step(warm_state, "bf16", kind)
    assert trainer.precision == "bf16" and trainer.scaler is None  # no GradScaler for bf16
    terms32, terms16 = _terms(out32), _terms(out16)
    assert set(terms32) == set(terms16) and len(terms32) == 11
    assert terms16 != terms32  # autocast really ran in bf16
    for key, value in terms32.items():
        assert terms16[key] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-4), key
    for k in g32:
        cosine = F.cosine_similarity(g32[k], g16[k], dim=0).item()
        assert cosine >= GRAD_COSINE, (k, cosine)


def test_bf16_with_channels_last_matches_fp32(warm_state):
    _, out32, g32 = _one_step(warm_state, "fp32")
    trainer, out16, g16 = _one_step(warm_state, "bf16", channels_last=True)
    weight = trainer.network.nets[0].down1.convs.conv_0.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert out16["loss"] == pytest.approx(out32["loss"], rel=LOSS_RTOL)
    for k in g32:
        assert F.cosine_similarity(g32[k], g16[k], dim=0).item() >= GRAD_COSINE


def test_channels_last_fp32_step_is_the_same_computation(warm_state):
    _, out, grads = _one_step(warm_state, "fp32")
    _, out_cl, grads_cl = _one_step(warm_state, "fp32", channels_last=True)
    assert out_cl["loss"] == pytest.approx(out["loss"], rel=1e-5)
    for k in grads:  # NHWC sums in another order: equal to rounding, not bitwise
        assert F.cosine_similarity(grads[k], grads_cl[k], dim=0).item() >= 0.9999
        assert (grads_cl[k] - grads[k]).abs().max().item() <= 1e-3 * grads[k].abs().max().item()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_seeded_runs_are_identical_within_a_precision(precision):
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        network = MultiModalCAM(["t1", "t2"], base_channels=BASE)
        trainer = _trainer(network, [_batch(0), _batch(1)], precision, kinds=("flip", "rotation", "scale"),
                           seed=5, channels_last=True)
        trainer.run()
        losses.append([trainer.state.output[0]["loss"]] + [p.detach().clone() for p in network.parameters()])
    assert losses[0][0] == losses[1][0]
    for a, b in zip(losses[0][1:], losses[1][1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("maps_fn", [cam_maps, gradcampp_maps])
def test_bf16_maps_match_fp32(warm_state, maps_fn):
    network = MultiModalCAM(["t1", "t2"], base_channels=BASE)
    network.load_state_dict(warm_state)
    x = _batch(3)["image"][:, :1]
    net = network.nets[0]
    reference = maps_fn(net, x)
    with P.autocast("cpu", "bf16"):
        low = maps_fn(P.to_memory_format(net, True), x)
    assert low.dtype == torch.float32
    difference = (low - reference).abs()
    assert 0 < difference.max().item() <= MAP_ATOL  # > 0: the backbone really ran in bf16
    assert difference.mean().item() <= MAP_MEAN_ATOL
    assert reference.amax().item() > 0.5  # the maps are not trivially empty


def test_multimodal_forward_normalises_in_float32_under_autocast(warm_state):
    network = MultiModalCAM(["t1", "t2"], base_channels=BASE, gate=False).eval()
    network.load_state_dict(warm_state)
    x = _batch(3)["image"]
    with torch.no_grad():
        reference = network(x)
        with P.autocast("cpu", "bf16"):
            low = network(x)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max().item() <= MAP_ATOL
    assert (low - reference).abs().mean().item() <= MAP_MEAN_ATOL


# ----------------------------------------------------------------------------- the switch


def _cpu_flags(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True), (False, False)])
def test_auto_follows_the_parity_switch_on_every_cpu(monkeypatch, avx512_bf16, amx):
    # the five-seed parity study passed (docs/performance.md): the switch is on as committed
    assert P.CPU_BF16_MASKS_MATCH
    monkeypatch.setattr(P, "CPU_BF16_MASKS_MATCH", False)  # the way back: fp32 on every CPU
    _cpu_flags(monkeypatch, avx512_bf16, amx)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # still available when asked for


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, caplog, avx512_bf16, amx, expected):
    monkeypatch.setattr(P, "CPU_BF16_MASKS_MATCH", True)  # as committed; explicit, so the test reads alone
    _cpu_flags(monkeypatch, avx512_bf16, amx)
    assert P.resolve_precision("auto", "cpu") == expected
    network = MultiModalCAM(["t1"], base_channels=4)
    with caplog.at_level("INFO", logger="scripts.method.trainer"):
        trainer = CMERTrainer("cpu", 1, [], network, ModalityOptimizers(network), build_objective(), precision="auto")
    assert trainer.precision == expected and not trainer.amp  # never a GradScaler on a CPU
    # the log says what `auto` became on this machine (the model file does not)
    assert f"training precision: {expected} (asked: auto; CPU kind" in caplog.text


def test_detection_falls_back_to_cpuinfo_flags(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx512f", "amx_bf16"})
    assert P.cpu_supports_bf16()
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx512f", "avx512bw"})  # emulated bf16 only
    assert not P.cpu_supports_bf16()


def test_resolution_per_device_and_errors(monkeypatch):
    _cpu_flags(monkeypatch, True, True)
    assert P.resolve_precision("auto", "cuda") == "fp16"
    assert P.uses_grad_scaler("cuda", "fp16") and not P.uses_grad_scaler("cuda", "bf16")
    assert not P.uses_grad_scaler("cpu", "fp16")
    assert P.resolve_precision(None, "cpu") == "fp32"
    assert P.resolve_precision("BF16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("half", "cpu")


def test_legacy_amp_flag_means_auto(monkeypatch):
    monkeypatch.setattr(P, "CPU_BF16_MASKS_MATCH", True)
    _cpu_flags(monkeypatch, False, False)
    network = MultiModalCAM(["t1"], base_channels=4)
    assert CMERTrainer("cpu", 1, [], network, ModalityOptimizers(network), build_objective(), amp=True).precision == "fp32"
    _cpu_flags(monkeypatch, True, False)
    assert CMERTrainer("cpu", 1, [], network, ModalityOptimizers(network), build_objective(), amp=True).precision == "bf16"
    assert CMERTrainer("cpu", 1, [], network, ModalityOptimizers(network), build_objective()).precision == "fp32"


@pytest.mark.parametrize("flags, kind", [({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX"),
                                         ({"avx2", "avx512f", "avx512_bf16"}, "AVX512 + BF16")])
def test_cpu_kind_names_the_bf16_kinds_from_the_flags(monkeypatch, flags, kind):
    """Records name the CPU kind (Zen 3 / Zen 4 / Xeon share a model name, "AMD EPYC")."""
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: flags)
    assert P.cpu_kind() == kind


def test_cpu_kind_falls_back_to_torchs_capability(monkeypatch):
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx2"})
    assert P.cpu_kind() == str(torch.backends.cpu.get_cpu_capability())
