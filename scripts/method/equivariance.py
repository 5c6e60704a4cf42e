"""The family of spatial transforms pi used by the equivariance constraints.

One transform TYPE is drawn per minibatch (flip, rotation, scale or translation) and its
parameters per batch or per sample. The same drawn transform is applied to the images of
all K modalities and to the CAMs, so everything here works on (B, C, H, W) batches, is
differentiable, and runs on CPU or GPU. All randomness comes from the caller's CPU
`torch.Generator`, so runs are reproducible by seed whatever device the tensors live on.

MONAI's array transforms (Flip, Rotate90, Zoom, Affine) act on one channel-first item with
one random draw per call, so batches use torch.flip / torch.rot90 / F.interpolate and
per-sample affine matrices from `monai.transforms.utils` applied with MONAI's
`AffineTransform` (= affine_grid + grid_sample).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform
from monai.transforms.utils import create_scale, create_translate

TRANSFORM_KINDS = ("flip", "rotation", "scale", "translation")
FLIP_AXES = {"horizontal": -1, "vertical": -2}  # horizontal = mirror left-right (W axis)
SCALE_MODES = ("resize", "warp")

DEFAULT_CONFIG: dict[str, Any] = {
    "rotation_ks": (0, 1, 2, 3),  # the paper's k; the authors' code used (1, 2, 3)
    "scale_range": (0.8, 1.2),
    "scale_mode": "resize",  # the canvas changes size, as in the authors' code
    "translate_fraction": 0.3,
    "integer_shift": False,  # the authors shift continuously (bilinear)
    "flip_axes": ("horizontal", "vertical"),
}

# Output pixels whose warped ones-image falls below this received zero-fill padding.
VALID_THRESHOLD = 0.999


def resolve_config(config: dict | None) -> dict[str, Any]:
    """Defaults overlaid with `config`; unknown keys and bad values raise ValueError."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown equivariance config keys {sorted(unknown)}; "
                         f"allowed: {sorted(DEFAULT_CONFIG)}")
    resolved = {**DEFAULT_CONFIG, **config}
    _validate_config(resolved)
    return resolved


def _validate_config(config: dict[str, Any]) -> None:
    ks = list(config["rotation_ks"])
    if not ks or any(int(k) not in (0, 1, 2, 3) for k in ks):
        raise ValueError(f"rotation_ks must be a non-empty subset of 0..3, got {ks}")
    low, high = (float(v) for v in config["scale_range"])
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {(low, high)}")
    if config["scale_mode"] not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {config['scale_mode']!r}")
    if not 0 <= float(config["translate_fraction"]) < 1:
        raise ValueError(f"translate_fraction must be in [0, 1), got {config['translate_fraction']}")
    axes = list(config["flip_axes"])
    if not axes or any(a not in FLIP_AXES for a in axes):
        raise ValueError(f"flip_axes must be a non-empty subset of {list(FLIP_AXES)}, got {axes}")


class DrawnTransform:
    """One drawn transform pi for a batch of B images of size (H, W).

    `apply(x)` maps (B, C, H, W) -> (B, C, H', W'); `inverse(y)` maps back; `valid_mask`
    marks with 1 the output pixels that came from inside the input's field of view.
    """

    kind = "identity"

    def __init__(self, batch_size: int, height: int, width: int) -> None:
        self.batch_size = batch_size
        self.height = height
        self.width = width

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def output_size(self) -> tuple[int, int]:
        return self.height, self.width

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, (self.height, self.width), "apply")
        return self._forward(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, self.output_size, "inverse")
        return self._backward(y)

    def valid_mask(self, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """(B, 1, H', W'): 1 where the output pixel came from inside the input."""
        return torch.ones(self.batch_size, 1, *self.output_size, dtype=dtype, device=device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _check(self, x: torch.Tensor, size: tuple[int, int], method: str) -> None:
        expected = (self.batch_size, size[0], size[1])
        if x.dim() != 4 or (x.shape[0], x.shape[-2], x.shape[-1]) != expected:
            raise ValueError(f"{self.kind}.{method}: expected (B, C, H, W) with (B, H, W) = "
                             f"{expected}, got {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class FlipTransform(DrawnTransform):
    """Mirror the whole batch along one axis (exact, its own inverse)."""

    kind = "flip"

    def __init__(self, batch_size: int, height: int, width: int, axis: str) -> None:
        super().__init__(batch_size, height, width)
        self.axis = axis

    @property
    def params(self) -> dict[str, Any]:
        return {"axis": self.axis}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[FLIP_AXES[self.axis]])

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return self._forward(y)


def _rotation_groups(ks: torch.Tensor, device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """(k, indices on `device` of the samples rotated by k) for every distinct k."""
    return [(int(k), torch.nonzero(ks == k).flatten().to(device)) for k in torch.unique(ks).tolist()]


def _rotate_per_sample(x: torch.Tensor, ks: torch.Tensor | None = None,
                       groups: list[tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
    """Rotate sample b by ks[b] * 90 degrees; one rot90 per distinct k, not per sample."""
    out = torch.zeros_like(x)
    for k, index in groups if groups is not None else _rotation_groups(ks, x.device):
        rotated = torch.rot90(x.index_select(0, index), k, dims=(-2, -1))
        out = out.index_copy(0, index, rotated)  # out-of-place: keeps the autograd graph
    return out


class RotationTransform(DrawnTransform):
    """Per-sample rotation by k * 90 degrees (exact). Needs H == W unless all k are even.

    The per-k sample indices are copied to a device once per drawn transform: the images and
    every CAM of a step reuse them, so the loss never waits on a host-to-device copy.
    """

    kind = "rotation"

    def __init__(self, batch_size: int, height: int, width: int, ks: torch.Tensor) -> None:
        super().__init__(batch_size, height, width)
        self.ks = ks.to(torch.long).cpu()
        self._groups: dict = {}

    @property
    def params(self) -> dict[str, Any]:
        return {"k": self.ks.clone()}

    def _groups_on(self, device: torch.device, inverse: bool) -> list[tuple[int, torch.Tensor]]:
        key = (str(device), inverse)
        if key not in self._groups:
            self._groups[key] = _rotation_groups((4 - self.ks) % 4 if inverse else self.ks, device)
        return self._groups[key]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rotate_per_sample(x, groups=self._groups_on(x.device, inverse=False))

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return _rotate_per_sample(y, groups=self._groups_on(y.device, inverse=True))


class ResizeScaleTransform(DrawnTransform):
    """Resize the whole batch by one ratio: the canvas becomes round(r*H) x round(r*W).

    Every output pixel is interpolated from inside the input, so the valid mask is all ones.
    """

    kind = "scale"

    def __init__(self, batch_size: int, height: int, width: int, ratio: float) -> None:
        super().__init__(batch_size, height, width)
        self.ratio = ratio
        # Round half up (Python's round() rounds half to even).
        self.scaled_size = (int(math.floor(ratio * height + 0.5)), int(math.floor(ratio * width + 0.5)))

    @property
    def params(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "mode": "resize", "size": self.scaled_size}

    @property
    def output_size(self) -> tuple[int, int]:
        return self.scaled_size

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=list(self.scaled_size), mode="bilinear", align_corners=False)

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(y, size=[self.height, self.width], mode="bilinear", align_corners=False)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear warp with zero fill; theta (B, 3, 3) maps normalised output -> input (x, y)."""
    # align_corners=False: normalised units of 2/size per pixel, so integer pixel shifts
    # land exactly on pixel centres.
    warp = AffineTransform(normalized=True, reverse_indexing=False, align_corners=False,
                           mode="bilinear", padding_mode="zeros")
    return warp(x, theta.to(device=x.device, dtype=x.dtype))


class AffineWarpTransform(DrawnTransform):
    """Same-canvas affine warp given per-sample matrices for pi and for its inverse.

    The matrices are copied to a device (and dtype) once per drawn transform and reused by
    every warp of the step, so the loss never waits on a host-to-device copy.
    """

    def __init__(self, batch_size: int, height: int, width: int, kind: str,
                 theta: torch.Tensor, inverse_theta: torch.Tensor, params: dict[str, Any]) -> None:
        super().__init__(batch_size, height, width)
        self.kind = kind
        self.theta = theta
        self.inverse_theta = inverse_theta
        self._params = params
        self._matrices: dict = {}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def _matrix_like(self, inverse: bool, x: torch.Tensor) -> torch.Tensor:
        key = (inverse, str(x.device), x.dtype)
        if key not in self._matrices:
            matrix = self.inverse_theta if inverse else self.theta
            self._matrices[key] = matrix.to(device=x.device, dtype=x.dtype)
        return self._matrices[key]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return _warp(x, self._matrix_like(False, x))

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return _warp(y, self._matrix_like(True, y))

    def valid_mask(self, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        ones = torch.ones(self.batch_size, 1, self.height, self.width, dtype=torch.float32, device=device)
        return (_warp(ones, self.theta) > VALID_THRESHOLD).to(dtype)


def _translation_matrices(shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, 3) matrices moving content by shifts[b] = (dh, dw) pixels.

    The matrix maps output to input coordinates in affine_grid's (x=W, y=H) order, so the
    content shift is negated; one pixel is 2/size normalised units.
    """
    matrices = [
        create_translate(2, [-2.0 * dw / width, -2.0 * dh / height], backend="torch")
        for dh, dw in shifts.tolist()
    ]
    return torch.stack(matrices).to(torch.float32)


def _scale_matrix(ratio: float, batch_size: int) -> torch.Tensor:
    """(B, 3, 3) zoom by `ratio` about the image centre (output -> input: divide by ratio)."""
    matrix = create_scale(2, [1.0 / ratio, 1.0 / ratio], backend="torch").to(torch.float32)
    return matrix.repeat(batch_size, 1, 1)


def _shift_indices(size: int, shifts: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index (B, size) of every output position, clamped, and whether it is inside."""
    source = torch.arange(size, device=device)[None, :] - shifts.to(device)[:, None]
    inside = (source >= 0) & (source < size)
    return source.clamp(0, size - 1), inside


class IntegerShiftTransform(DrawnTransform):
    """Per-sample translation by whole pixels, by gathering (exact, zero fill)."""

    kind = "translation"

    def __init__(self, batch_size: int, height: int, width: int, shifts: torch.Tensor) -> None:
        super().__init__(batch_size, height, width)
        self.shifts = shifts.to(torch.long).cpu()  # (B, 2) = (dh, dw)

    @property
    def params(self) -> dict[str, Any]:
        return {"shift": self.shifts.to(torch.float32), "integer_shift": True}

    def _shift(self, x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        rows, rows_inside = _shift_indices(self.height, shifts[:, 0], x.device)
        cols, cols_inside = _shift_indices(self.width, shifts[:, 1], x.device)
        batch = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        gathered = x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        inside = (rows_inside[:, None, :, None] & cols_inside[:, None, None, :]).to(x.dtype)
        return gathered * inside

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shift(x, self.shifts)

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        return self._shift(y, -self.shifts)

    def valid_mask(self, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        ones = torch.ones(self.batch_size, 1, self.height, self.width, dtype=dtype, device=device)
        return self._shift(ones, self.shifts)


def _uniform(low: float, high: float, shape: Sequence[int],
             generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _draw_flip(batch_size, height, width, generator, config) -> DrawnTransform:
    axes = list(config["flip_axes"])
    axis = axes[int(torch.randint(len(axes), (1,), generator=generator))]
    return FlipTransform(batch_size, height, width, axis)


def _draw_rotation(batch_size, height, width, generator, config) -> DrawnTransform:
    allowed = torch.tensor([int(k) for k in config["rotation_ks"]], dtype=torch.long)
    if height != width and bool((allowed % 2 == 1).any()):
        raise ValueError(f"rotation by odd multiples of 90 degrees needs square images, got "
                         f"{height}x{width}; set rotation_ks to (0, 2) or resize the slices")
    ks = allowed[torch.randint(len(allowed), (batch_size,), generator=generator)]
    return RotationTransform(batch_size, height, width, ks)


def _draw_scale(batch_size, height, width, generator, config) -> DrawnTransform:
    low, high = (float(v) for v in config["scale_range"])
    ratio = float(_uniform(low, high, (1,), generator))
    if config["scale_mode"] == "resize":
        return ResizeScaleTransform(batch_size, height, width, ratio)
    return AffineWarpTransform(
        batch_size, height, width, "scale", theta=_scale_matrix(ratio, batch_size),
        inverse_theta=_scale_matrix(1.0 / ratio, batch_size),
        params={"ratio": ratio, "mode": "warp", "size": (height, width)},
    )


def _draw_translation(batch_size, height, width, generator, config) -> DrawnTransform:
    fraction = float(config["translate_fraction"])
    limits = torch.tensor([fraction * height, fraction * width])
    shifts = _uniform(-1.0, 1.0, (batch_size, 2), generator) * limits  # (B, 2) = (dh, dw)
    if config["integer_shift"]:
        return IntegerShiftTransform(batch_size, height, width, torch.round(shifts))
    return AffineWarpTransform(
        batch_size, height, width, "translation",
        theta=_translation_matrices(shifts, height, width),
        inverse_theta=_translation_matrices(-shifts, height, width),
        params={"shift": shifts, "integer_shift": False},
    )


def _draw_identity(batch_size: int, height: int, width: int, generator, config: dict) -> DrawnTransform:
    """pi = identity: a control, not one of the paper's transforms (issue 34). With `kinds: [identity]` the
    second view is the image itself: L_ER vanishes and L_CMER is cross-modality agreement without
    equivariance; draws nothing from `generator`."""
    return DrawnTransform(batch_size, height, width)


_DRAWERS = {
    "flip": _draw_flip,
    "rotation": _draw_rotation,
    "scale": _draw_scale,
    "translation": _draw_translation,
    "identity": _draw_identity,
}


def draw_transform(kind: str, batch_size: int, height: int, width: int,
                   generator: torch.Generator | None, config: dict | None = None) -> DrawnTransform:
    """Draw the parameters of one transform of type `kind` for a (B, ., H, W) batch.

    `generator` must be a CPU generator (None falls back to torch's global RNG).
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown transform kind {kind!r}: expected one of {list(_DRAWERS)}")
    return _DRAWERS[kind](batch_size, height, width, generator, resolve_config(config))


def draw_from(kinds: Sequence[str], batch_size: int, height: int, width: int,
              generator: torch.Generator | None, config: dict | None = None) -> DrawnTransform:
    """Draw the transform TYPE uniformly from `kinds` (one per minibatch), then its parameters."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise ValueError("draw_from needs at least one transform kind")
    unknown = [k for k in kinds if k not in _DRAWERS]
    if unknown:
        raise ValueError(f"unknown transform kinds {unknown}: expected some of {list(_DRAWERS)}")
    kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    return draw_transform(kind, batch_size, height, width, generator, config)
