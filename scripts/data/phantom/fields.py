"""Smooth random fields for the phantom: anatomy warps, tumour shapes, bias fields and
multi-scale tissue texture."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

class SmoothRandomField:
    """Gaussian random field: i.i.d. normal weights on a lattice of Gaussian bumps.

    The lattice step equals the bump's sigma, which makes the sum of squared bumps
    pi^(3/2) everywhere inside the lattice, so the field has unit variance (times
    `amplitude`). The bumps are separable, so a regular grid is sampled with three small
    matrix products.
    """

    def __init__(self, rng: np.random.Generator, lower_mm, upper_mm, correlation_mm: float,
                 channels: int = 1, amplitude: float = 1.0):
        rng = np.random.default_rng(rng.integers(2**63))  # one draw from the caller's stream
        self.sigma = correlation_mm / 2.0
        self.centres = [
            np.arange(lo - 2 * self.sigma, hi + 2 * self.sigma + 1e-6, self.sigma, dtype=np.float32)
            for lo, hi in zip(lower_mm, upper_mm)
        ]
        shape = (channels, *(len(c) for c in self.centres))
        unit_variance = np.pi ** -0.75
        self.weights = (rng.standard_normal(shape) * (amplitude * unit_variance)).astype(np.float32)

    def on_grid(self, axes_mm: Sequence[np.ndarray]) -> np.ndarray:
        """Field at the grid spanned by three 1-D coordinate arrays -> (channels, x, y, z)."""
        bases = [np.exp(-0.5 * ((np.asarray(a, np.float32)[:, None] - c[None, :]) / self.sigma) ** 2)
                 for a, c in zip(axes_mm, self.centres)]
        return np.einsum("kabc,xa,yb,zc->kxyz", self.weights, *bases, optimize=True).astype(np.float32)

    def at_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Field at scattered points (3, N) -> (channels, N), contracted one axis at a time
        (a single einsum over all three axes builds a far larger intermediate)."""
        a, b, c = (np.exp(-0.5 * ((np.asarray(p, np.float32)[:, None] - centres[None, :]) / self.sigma) ** 2)
                   for p, centres in zip(points_mm, self.centres))
        partial = np.einsum("kabc,nc->kabn", self.weights, c)
        partial = np.einsum("kabn,nb->kan", partial, b)
        return np.einsum("kan,na->kn", partial, a).astype(np.float32)

def voxel_average_std(scale_mm: float, spacing: float) -> float:
    """Share of a texture scale's standard deviation that survives averaging over a voxel.

    A voxel's signal is the mean over its volume, so heterogeneity finer than the voxel
    averages out: a Gaussian-correlated field (kernel sigma = scale / 2) seen through a box of
    side `spacing` keeps the variance (s^2 / (s^2 + spacing^2 / 12))^(3/2) in 3D. At 1 mm the
    finest tumour scale (1.5 mm) keeps 0.90 of its std, at 3 mm 0.53: without this, a 3 mm
    phantom carried 1 mm speckle in every tumour, 2-4 times the high-frequency residual of
    its normal brain where real tumours have 0.5-0.9 times (docs/recipe.md, "Real scans").
    """
    sigma = 0.5 * float(scale_mm)
    return float((sigma ** 2 / (sigma ** 2 + float(spacing) ** 2 / 12.0)) ** 0.75)


def texture_field(rng: np.random.Generator, shape: Sequence[int], spacing: float,
                  scales_mm: Sequence[float], weights: Sequence[float], voxel_average: bool = False) -> np.ndarray:
    """Zero-mean, unit-variance texture: a weighted sum of Gaussian-filtered white noise at
    several correlation lengths (mm), each scale normalised to unit variance first.

    Scales below the voxel size act as voxel-level heterogeneity. With `voxel_average` (a
    texture of the signal, which a voxel integrates) each scale is attenuated by what survives
    averaging over the voxel (`voxel_average_std`); without it (fields that are thresholded
    into shapes) every scale keeps unit variance."""
    rng = np.random.default_rng(rng.integers(2**63))  # one draw: the caller's stream is size-independent
    total = np.zeros(tuple(shape), np.float32)
    for scale, weight in zip(scales_mm, weights):
        noise = rng.standard_normal(tuple(shape), dtype=np.float32)
        sigma = 0.5 * scale / spacing
        if sigma > 0.3:
            noise = ndi.gaussian_filter(noise, sigma, mode="reflect")
        noise /= max(float(noise.std()), 1e-6)
        kept = voxel_average_std(scale, spacing) if voxel_average else 1.0
        total += np.float32(weight * kept) * noise
    norm = float(np.sqrt(np.sum(np.square(weights))))
    return total / np.float32(max(norm, 1e-6))
