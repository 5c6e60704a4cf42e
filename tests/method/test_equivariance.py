"""Tests for scripts/method/equivariance.py: the transforms pi, their inverses and valid masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scripts.method.equivariance import (
    DrawnTransform,
    TRANSFORM_KINDS,
    draw_from,
    draw_transform,
    resolve_config,
)

SIZE = 32
BATCH = 4

# Every transform variant: (kind, config).
VARIANTS = {
    "flip": ("flip", {}),
    "rotation": ("rotation", {}),
    "scale_resize": ("scale", {}),
    "scale_warp": ("scale", {"scale_mode": "warp"}),
    "translation": ("translation", {}),
    "translation_integer": ("translation", {"integer_shift": True}),
}
EXACT_VARIANTS = ["flip", "rotation", "translation_integer"]
INTERPOLATING_VARIANTS = ["scale_resize", "scale_warp", "translation"]


def _draw(variant: str, seed: int = 0, batch: int = BATCH, size: int = SIZE) -> DrawnTransform:
    kind, config = VARIANTS[variant]
    return draw_transform(kind, batch, size, size, torch.Generator().manual_seed(seed), config)


def _noise(batch: int = BATCH, channels: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _smooth(batch: int = BATCH, channels: int = 2, size: int = SIZE) -> torch.Tensor:
    """Low-frequency images (amplitude 1): interpolation errors stay around 1e-2."""
    rows, cols = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    images = [
        torch.sin(math.pi * (0.75 + 0.25 * b) * cols + 0.5 * c)
        * torch.cos(math.pi * (0.5 + 0.25 * c) * rows + 0.3 * b)
        for b in range(batch) for c in range(channels)
    ]
    return torch.stack(images).reshape(batch, channels, size, size)


def _ramp(batch: int = BATCH, size: int = SIZE) -> torch.Tensor:
    """f(y, x) = 0.5 y + 0.25 x + 1: bilinear interpolation reproduces it exactly."""
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return (0.5 * rows + 0.25 * cols + 1.0).expand(batch, 1, size, size).clone()


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    return x**2 + 1


def _box_blur(x: torch.Tensor) -> torch.Tensor:
    # Symmetric kernel + symmetric zero padding: equivariant to flips and rot90 everywhere.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose whole 3x3 neighbourhood is valid (and not on the image border)."""
    return -F.max_pool2d(-F.pad(mask, [1, 1, 1, 1]), 3, stride=1)


def _on(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x * mask


# --- equivariance of known maps -------------------------------------------------------------


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_transforms_commute_with_pointwise_map_and_blur(variant, seed):
    transform, x = _draw(variant, seed), _noise(seed=seed)
    mask = transform.valid_mask()
    torch.testing.assert_close(_on(mask, transform.apply(_pointwise(x))),
                               _on(mask, _pointwise(transform.apply(x))))
    interior = _erode(mask)  # blur near a zero-filled border sees the fill
    assert interior.sum() > 0
    torch.testing.assert_close(_on(interior, transform.apply(_box_blur(x))),
                               _on(interior, _box_blur(transform.apply(x))))


@pytest.mark.parametrize("variant", INTERPOLATING_VARIANTS)
@pytest.mark.parametrize("seed", [1, 2, 3])  # seed 0 draws a scale ratio of ~1.0
def test_interpolating_transforms_commute_with_pointwise_map_on_valid_region(variant, seed):
    transform, x = _draw(variant, seed), _smooth()
    mask = transform.valid_mask()
    # Affine pointwise maps commute with bilinear interpolation exactly (weights sum to 1).
    affine = lambda t: 3 * t - 2  # noqa: E731
    torch.testing.assert_close(_on(mask, transform.apply(affine(x))), _on(mask, affine(transform.apply(x))),
                               rtol=0, atol=1e-5)
    # Non-linear ones only up to interpolation error on smooth images.
    error = _on(mask, transform.apply(_pointwise(x)) - _pointwise(transform.apply(x))).abs().max()
    assert error < 0.015


def test_translation_commutes_with_blur_away_from_borders():
    transform, x = _draw("translation", 3), _smooth()
    interior = _erode(transform.valid_mask())
    # Away from the fill, a uniform sub-pixel shift is itself a convolution: it commutes.
    error = _on(interior, transform.apply(_box_blur(x)) - _box_blur(transform.apply(x))).abs().max()
    assert error < 1e-5


def test_equivariance_checks_can_fail():
    # A map that is not equivariant (a fixed spatial weighting) must be caught by the check.
    transform, x = _draw("translation_integer", 0), _noise()
    weighting = torch.linspace(0, 1, SIZE)[None, None, None, :]
    mask = transform.valid_mask()
    difference = _on(mask, transform.apply(x * weighting) - transform.apply(x) * weighting)
    assert difference.abs().max() > 0.1


# --- geometry: where the content goes -------------------------------------------------------


def test_translation_moves_content_by_drawn_shift():
    transform = _draw("translation", 5)
    shifted = transform.apply(_ramp())
    shifts = transform.params["shift"]  # (B, 2) = (dh, dw) in pixels
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    expected = torch.stack([0.5 * (rows - dh) + 0.25 * (cols - dw) + 1.0
                            for dh, dw in shifts.tolist()])[:, None]
    mask = transform.valid_mask()
    torch.testing.assert_close(_on(mask, shifted), _on(mask, expected), rtol=0, atol=1e-4)


def test_integer_translation_is_exact_pixel_shift():
    transform = _draw("translation_integer", 4)
    x = _noise()
    shifted = transform.apply(x)
    for b, (dh, dw) in enumerate(transform.params["shift"].long().tolist()):
        rolled = torch.roll(x[b], shifts=(dh, dw), dims=(-2, -1))
        mask = transform.valid_mask()[b]
        assert torch.equal(shifted[b], rolled * mask)


def test_scale_warp_zooms_about_the_centre():
    transform = _draw("scale_warp", 1)
    ratio = transform.params["ratio"]
    centre = (SIZE - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    source_rows, source_cols = (rows - centre) / ratio + centre, (cols - centre) / ratio + centre
    expected = (0.5 * source_rows + 0.25 * source_cols + 1.0).expand(BATCH, 1, SIZE, SIZE)
    mask = transform.valid_mask()
    torch.testing.assert_close(_on(mask, transform.apply(_ramp())), _on(mask, expected), rtol=0, atol=1e-4)


def test_rotation_is_per_sample_rot90():
    transform = _draw("rotation", 0, batch=16)
    ks = transform.params["k"]
    assert len(set(ks.tolist())) > 1  # samples really get different rotations
    x = _noise(batch=16)
    rotated = transform.apply(x)
    for b, k in enumerate(ks.tolist()):
        assert torch.equal(rotated[b], torch.rot90(x[b], k, dims=(-2, -1)))


def test_rotation_ks_follow_config():
    generator = torch.Generator().manual_seed(0)
    paper = draw_transform("rotation", 400, 8, 8, generator, None).params["k"]
    authors = draw_transform("rotation", 400, 8, 8, generator, {"rotation_ks": (1, 2, 3)}).params["k"]
    assert set(paper.tolist()) == {0, 1, 2, 3}
    assert set(authors.tolist()) == {1, 2, 3}


def test_flip_axes_follow_config():
    x = _noise()
    for axis, dim in (("horizontal", -1), ("vertical", -2)):
        transform = draw_transform("flip", BATCH, SIZE, SIZE, torch.Generator(), {"flip_axes": (axis,)})
        assert transform.params["axis"] == axis
        assert torch.equal(transform.apply(x), x.flip(dim))


# --- inverses -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flip", "rotation"])
def test_inverse_is_exact_for_flip_and_rotation(variant):
    transform, x = _draw(variant, 3), _noise()
    assert not torch.equal(transform.apply(x), x)  # seed 3 draws a non-identity transform
    assert torch.equal(transform.inverse(transform.apply(x)), x)


def test_inverse_of_integer_translation_restores_the_kept_pixels():
    transform, x = _draw("translation_integer", 2), _noise()
    kept = transform.inverse(transform.valid_mask())
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(transform.inverse(transform.apply(x)), x * kept)


@pytest.mark.parametrize("variant", INTERPOLATING_VARIANTS)
def test_inverse_is_close_for_interpolating_transforms(variant):
    transform, x = _draw(variant, 1), _smooth()
    kept = (transform.inverse(transform.valid_mask()) > 0.999).float()
    assert kept.sum() > 0.4 * kept.numel()
    restored = transform.inverse(transform.apply(x))
    assert restored.shape == x.shape
    assert _on(kept, restored - x).abs().max() < 0.015
    # ... and the check is not vacuous: the transformed image itself is far from x.
    if transform.output_size == (SIZE, SIZE):
        assert _on(kept, transform.apply(x) - x).abs().max() > 0.05


# --- valid masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flip", "rotation", "scale_resize"])
def test_valid_mask_is_all_ones_without_fill(variant):
    transform = _draw(variant, 0)
    mask = transform.valid_mask(torch.float64)
    assert mask.shape == (BATCH, 1, *transform.output_size) and mask.dtype == torch.float64
    assert torch.equal(mask, torch.ones_like(mask))


def _expected_shift_mask(shifts: torch.Tensor, size: int) -> torch.Tensor:
    """1 where the output pixel's source position (y - dh, x - dw) lies inside the image."""
    positions = torch.arange(size).float()
    masks = []
    for dh, dw in shifts.tolist():
        rows = ((positions - dh) >= 0) & ((positions - dh) <= size - 1)
        cols = ((positions - dw) >= 0) & ((positions - dw) <= size - 1)
        masks.append((rows[:, None] & cols[None, :]).float())
    return torch.stack(masks)[:, None]


@pytest.mark.parametrize("variant", ["translation", "translation_integer"])
def test_translation_valid_mask_is_the_shifted_rectangle(variant):
    transform = _draw(variant, 7)
    expected = _expected_shift_mask(transform.params["shift"], SIZE)
    assert expected.sum() < expected.numel()  # the shifts really cut something off
    assert torch.equal(transform.valid_mask(), expected)


def test_scale_warp_valid_mask_excludes_zoomed_out_border():
    generator = torch.Generator()
    zoom_out = draw_transform("scale", 2, SIZE, SIZE, generator,
                              {"scale_mode": "warp", "scale_range": (0.8, 0.8)})
    zoom_in = draw_transform("scale", 2, SIZE, SIZE, generator,
                             {"scale_mode": "warp", "scale_range": (1.2, 1.2)})
    mask = zoom_out.valid_mask()
    assert mask[..., 0, :].sum() == 0 and mask[..., SIZE // 2, SIZE // 2].min() == 1
    assert torch.equal(zoom_in.valid_mask(), torch.ones(2, 1, SIZE, SIZE))


# --- shapes, gradients, devices -------------------------------------------------------------


@pytest.mark.parametrize("ratio, expected_side", [(0.8, 26), (1.2, 38), (1.0, 32)])
def test_scale_resize_shapes(ratio, expected_side):
    transform = draw_transform("scale", 2, SIZE, SIZE, torch.Generator(), {"scale_range": (ratio, ratio)})
    y = transform.apply(_noise(batch=2))
    assert y.shape == (2, 2, expected_side, expected_side) == (2, 2, *transform.output_size)
    assert transform.valid_mask().shape == (2, 1, expected_side, expected_side)
    assert transform.inverse(y).shape == (2, 2, SIZE, SIZE)


def test_scale_ratio_stays_in_range_and_sets_the_size():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        transform = draw_transform("scale", 1, 30, 40, generator, None)
        ratio = transform.params["ratio"]
        assert 0.8 <= ratio <= 1.2
        assert transform.output_size == (math.floor(ratio * 30 + 0.5), math.floor(ratio * 40 + 0.5))


def test_translation_shifts_stay_within_fraction():
    transform = draw_transform("translation", 500, 20, 40, torch.Generator().manual_seed(0), None)
    shifts = transform.params["shift"]
    assert shifts[:, 0].abs().max() <= 0.3 * 20 and shifts[:, 1].abs().max() <= 0.3 * 40
    assert shifts[:, 1].abs().max() > 0.25 * 40  # the range is used, per axis
    assert len(set(shifts[:, 0].tolist())) == 500  # per sample


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_flow_through_apply(variant):
    transform = _draw(variant, 0)
    x = _noise().requires_grad_(True)
    (transform.apply(x) * torch.arange(2.0)[None, :, None, None]).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_rejects_inputs_of_the_wrong_size():
    transform = _draw("translation", 0)
    with pytest.raises(ValueError, match="expected"):
        transform.apply(torch.zeros(BATCH, 1, SIZE, SIZE + 1))
    with pytest.raises(ValueError, match="expected"):
        transform.apply(torch.zeros(BATCH + 1, 1, SIZE, SIZE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_matches_cpu_with_cpu_generator(variant):
    transform, x = _draw(variant, 0), _smooth()
    on_gpu = transform.apply(x.cuda())
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), transform.apply(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(transform.valid_mask(device="cuda").cpu(), transform.valid_mask())


# --- drawing --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_draws_are_deterministic_by_seed(variant):
    x = _noise()
    first, again = _draw(variant, 11), _draw(variant, 11)
    assert repr(first) == repr(again)
    assert torch.equal(first.apply(x), again.apply(x))


def test_different_seeds_draw_different_parameters():
    assert not torch.equal(_draw("translation", 1).params["shift"], _draw("translation", 2).params["shift"])
    assert _draw("scale_resize", 1).params["ratio"] != _draw("scale_resize", 2).params["ratio"]


def test_draw_from_covers_all_kinds_uniformly():
    generator = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(TRANSFORM_KINDS, 0)
    for _ in range(400):
        counts[draw_from(TRANSFORM_KINDS, 2, 16, 16, generator, None).kind] += 1
    assert all(60 < count < 140 for count in counts.values()), counts


def test_draw_from_respects_the_kind_subset_and_seed():
    kinds = ["flip", "scale"]
    draws = [draw_from(kinds, 2, 16, 16, torch.Generator().manual_seed(s), None) for s in range(20)]
    assert {d.kind for d in draws} == set(kinds)
    repeat = [draw_from(kinds, 2, 16, 16, torch.Generator().manual_seed(s), None) for s in range(20)]
    assert [repr(d) for d in draws] == [repr(d) for d in repeat]


def test_invalid_requests_raise():
    generator = torch.Generator()
    with pytest.raises(ValueError, match="unknown transform kind"):
        draw_transform("shear", 2, 16, 16, generator, None)
    with pytest.raises(ValueError, match="unknown transform kinds"):
        draw_from(["flip", "shear"], 2, 16, 16, generator, None)
    with pytest.raises(ValueError, match="unknown equivariance config keys"):
        resolve_config({"rotation_k": (1,)})
    with pytest.raises(ValueError, match="square"):
        draw_transform("rotation", 2, 16, 20, generator, None)
    with pytest.raises(ValueError, match="scale_mode"):
        resolve_config({"scale_mode": "crop"})
    # Half turns keep a non-square canvas, so they are allowed.
    half_turns = draw_transform("rotation", 2, 16, 20, generator, {"rotation_ks": (0, 2)})
    assert half_turns.apply(torch.zeros(2, 1, 16, 20)).shape == (2, 1, 16, 20)


def test_identity_is_a_control_that_leaves_the_view_unchanged():
    """`transforms#kinds: [identity]`: the second view is the image (issue 34's pi = identity control)."""
    x = torch.randn(2, 3, 16, 16)
    pi = draw_from(["identity"], 2, 16, 16, torch.Generator().manual_seed(0), None)
    assert pi.kind == "identity" and torch.equal(pi.apply(x), x) and torch.equal(pi.inverse(x), x)
    assert "identity" not in TRANSFORM_KINDS  # not one of the paper's transforms (Fig. 3 does not sweep it)
