"""Domain randomisation of training batches: what real scans vary in and the phantom does not.

A phantom drawn from one anatomy template, one texture family and one renderer teaches the
networks what is specific to it (docs/recipe.md, "Real scans"). `BatchRandomiser`, the training
loader's collate function, draws for every slice (anatomy) and for every slice and modality
(everything else) what real acquisitions vary in, so that what stays constant across draws is
the tumour, not the phantom:

    anatomy      rotation, isotropic scale and a smooth elastic deformation (images and tumour
                 mask together: the modalities stay co-registered)
    contrast     a random monotone intensity curve (tissue contrasts change, their order within a
                 modality does not: the prior-centred variant), then a gamma
    bias         a smooth multiplicative field
    resolution   a lower acquisition resolution (area down-sampling, bilinear back), then a blur
    noise        Rician noise on magnitudes
    lesion       the tumour's own contrast and texture, redrawn apart from the tissues': its local
                 mean's distance from the brain's mean is scaled, its fine texture (the residual
                 about that mean) is damped or kept, per slice and modality (real tumours are
                 smoother than their brain at 3 mm, the phantom's rougher: docs/recipe.md,
                 "Real scans"; `python -m tools.texture_ratio` measures it)

These are MONAI's RandAffine / Rand2DElastic, RandHistogramShift, RandAdjustContrast,
RandBiasField, RandSimulateLowResolution, RandGaussianSmooth and RandRicianNoise (the lesion step has
no MONAI counterpart: it needs the tumour mask, which MONAI's intensity transforms do not take), written here
in batched torch because MONAI's run per item: measured on a quiet 2-core Zen 4 (fp32), MONAI's
chain costs 17.6 ms per 80 x 80 slice of four modalities, 280 ms per batch of 16 (about 20 % of a
training step), the batched version 28 ms per batch (about 2 %).

Slices arrive z-scored over their volume's brain with a background of exactly 0, and must
leave that way (inference normalises the same): each modality's brain is put on [0, 1] before
the multiplicative steps, the background is zeroed after the smoothing ones, and the brain's
mean and standard deviation on the slice are restored at the end (a tumour slice stays as bright
relative to its volume as before; only the shape of its intensity distribution changes). The
weak label is recomputed from the moved mask: a slice is tumour iff its tumour mask is
non-empty after every transform.

Draws come from a generator seeded from torch's global one, which the training checkpoint
saves (`scripts.workflows.checkpoints.RandomStates`), so a resumed run draws the same; in loader
worker processes torch seeds each worker apart, so workers do not repeat each other's draws.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

EPS = 1e-6
CONTROL_POINTS = 8  # knots of the random intensity curve over the brain's [0, 1] range
BIAS_GRID = 4  # the bias field is a 4 x 4 grid of log-gains, bicubic to the slice (smooth, low order)
LESION_MEAN_SIGMA = 3.0  # pixels: the tumour's local mean; finer than this is its texture (tools/texture_ratio scales)
LESION_FEATHER_SIGMA = 1.0  # pixels: the redrawn tumour blends into its surroundings (no new edge)


def _gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """MONAI's Gaussian filter (sampled kernel to 3 sigma, zero padding) over (N, H, W); callers divide by the
    smoothed support. (The lesion runs recorded at commit 1fb2051 used an equivalent hand-written filter: at most
    0.002 apart on [0, 1] data, at the borders.)"""
    from monai.networks.layers import GaussianFilter

    return GaussianFilter(2, float(sigma), truncated=3.0, approx="sampled")(x[:, None])[:, 0]


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _chosen(generator: torch.Generator, shape, probability: float) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < probability


class BatchRandomiser:
    """Collate function of the training loader: default collation, then domain randomisation.

    Args:
        enabled: false collates only (the phantom as rendered; the switch).
        anatomy_prob: probability a slice is rotated, scaled and deformed.
        rotate_deg: rotation range, +- degrees.
        scale: isotropic scale range, +- (0.2 = 0.8 to 1.2).
        elastic_pixels: largest elastic displacement, pixels (a smooth field on `elastic_grid`).
        elastic_grid: control points per side of the elastic field.
        contrast_prob: probability, per slice and modality, of a random monotone intensity curve.
        contrast_strength: log-normal spread of the curve's slopes (0 = identity).
        gamma_log_std: standard deviation of log(gamma) (0 = no gamma).
        bias_prob: probability, per slice and modality, of a bias field.
        bias_log_std: largest standard deviation of the field's log-gain.
        lowres_prob: probability, per slice and modality, of a lower acquisition resolution.
        lowres_zoom: range of the in-plane down-sampling factor (1 = none).
        blur_prob: probability, per slice and modality, of a Gaussian blur.
        blur_sigma: range of the blur's sigma, pixels.
        noise_prob: probability, per slice and modality, of Rician noise.
        noise_std: largest noise standard deviation, relative to the brain's intensity range.
        lesion_prob: probability, per tumour slice and modality, that the tumour's contrast and
            texture are redrawn (0 = never: the tumour as rendered).
        lesion_contrast_log_std: standard deviation of the log-gain on the tumour's local mean's
            distance from the brain's mean (0 = its contrast kept).
        lesion_texture: range of the factor on the tumour's fine texture (0 = smooth, 1 = as
            rendered).
    """

    def __init__(self, enabled: bool = True, anatomy_prob: float = 0.5, rotate_deg: float = 15.0, scale: float = 0.2,
                 elastic_pixels: float = 2.0, elastic_grid: int = 5, contrast_prob: float = 0.8,
                 contrast_strength: float = 0.5, gamma_log_std: float = 0.3, bias_prob: float = 0.5,
                 bias_log_std: float = 0.3, lowres_prob: float = 0.3, lowres_zoom: Sequence[float] = (0.5, 1.0),
                 blur_prob: float = 0.3, blur_sigma: Sequence[float] = (0.3, 1.0), noise_prob: float = 0.3,
                 noise_std: float = 0.05, lesion_prob: float = 0.0, lesion_contrast_log_std: float = 0.4,
                 lesion_texture: Sequence[float] = (0.0, 1.0)):
        from scripts.runtime import as_flag

        probabilities = dict(anatomy_prob=anatomy_prob, contrast_prob=contrast_prob, bias_prob=bias_prob,
                             lowres_prob=lowres_prob, blur_prob=blur_prob, noise_prob=noise_prob,
                             lesion_prob=lesion_prob)
        for name, value in probabilities.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"domain_randomisation#{name} is a probability in [0, 1], got {value!r}")
        if not 0.0 < float(lowres_zoom[0]) <= float(lowres_zoom[1]) <= 1.0:
            raise ValueError(f"domain_randomisation#lowres_zoom is a range within (0, 1], got {lowres_zoom!r}")
        if not 0.0 <= float(lesion_texture[0]) <= float(lesion_texture[1]):
            raise ValueError(f"domain_randomisation#lesion_texture is a range of factors >= 0, got {lesion_texture!r}")
        if float(lesion_contrast_log_std) < 0:
            raise ValueError("domain_randomisation#lesion_contrast_log_std is a standard deviation >= 0, "
                             f"got {lesion_contrast_log_std!r}")
        self.enabled = as_flag(enabled, "domain_randomisation#enabled")
        self.anatomy_prob, self.rotate = float(anatomy_prob), math.radians(float(rotate_deg))
        self.scale, self.elastic_pixels, self.elastic_grid = float(scale), float(elastic_pixels), int(elastic_grid)
        self.contrast_prob, self.contrast_strength = float(contrast_prob), float(contrast_strength)
        self.gamma_log_std = float(gamma_log_std)
        self.bias_prob, self.bias_log_std = float(bias_prob), float(bias_log_std)
        self.lowres_prob, self.lowres_zoom = float(lowres_prob), (float(lowres_zoom[0]), float(lowres_zoom[1]))
        self.blur_prob, self.blur_sigma = float(blur_prob), (float(blur_sigma[0]), float(blur_sigma[1]))
        self.noise_prob, self.noise_std = float(noise_prob), float(noise_std)
        self.lesion_prob, self.lesion_contrast_log_std = float(lesion_prob), float(lesion_contrast_log_std)
        self.lesion_texture = (float(lesion_texture[0]), float(lesion_texture[1]))

    # ----------------------------------------------------------------------------- anatomy

    def _move(self, g: torch.Generator, image: torch.Tensor, mask: torch.Tensor):
        """Rotate, scale and deform each chosen slice (B, K, H, W) with its mask (B, 1, H, W)."""
        b, _, h, w = image.shape
        chosen = _chosen(g, (b,), self.anatomy_prob).float()
        angle = _uniform(g, (b,), -self.rotate, self.rotate) * chosen
        zoom = 1.0 + _uniform(g, (b,), -self.scale, self.scale) * chosen
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
        grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
        coarse = torch.randn((b, 2, self.elastic_grid, self.elastic_grid), generator=g)
        coarse = coarse * (self.elastic_pixels * 2.0 / max(h, w)) * chosen[:, None, None, None] / 2.0
        grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        moved = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved_mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        keep = chosen[:, None, None, None] > 0  # slices not drawn stay bit for bit (an identity warp is not exact)
        return torch.where(keep, moved, image), torch.where(keep, moved_mask, mask)

    # ----------------------------------------------------------------------------- intensities

    def _curve(self, g: torch.Generator, u: torch.Tensor) -> torch.Tensor:
        """A random monotone piecewise-linear curve of [0, 1] onto [0, 1], per (slice, modality)."""
        n = u.shape[0]
        slopes = torch.exp(self.contrast_strength * torch.randn((n, CONTROL_POINTS - 1), generator=g))
        slopes = torch.where(_chosen(g, (n, 1), self.contrast_prob), slopes, torch.ones_like(slopes))
        knots = torch.cat([torch.zeros(n, 1), torch.cumsum(slopes, 1)], 1)
        knots = knots / knots[:, -1:]
        position = u.reshape(n, -1).clamp(0, 1) * (CONTROL_POINTS - 1)
        index = position.floor().clamp(max=CONTROL_POINTS - 2).long()
        low, high = knots.gather(1, index), knots.gather(1, index + 1)
        out = low + (position - index) * (high - low)
        gamma = torch.exp(self.gamma_log_std * torch.randn((n, 1), generator=g))
        gamma = torch.where(_chosen(g, (n, 1), self.contrast_prob), gamma, torch.ones_like(gamma))
        return out.clamp_min(0).pow(gamma).reshape(u.shape)

    def _bias(self, g: torch.Generator, u: torch.Tensor) -> torch.Tensor:
        n, h, w = u.shape
        strength = _uniform(g, (n, 1, 1, 1), 0.0, self.bias_log_std) * _chosen(g, (n, 1, 1, 1), self.bias_prob)
        log_gain = torch.randn((n, 1, BIAS_GRID, BIAS_GRID), generator=g) * strength
        return u * torch.exp(F.interpolate(log_gain, size=(h, w), mode="bicubic", align_corners=True))[:, 0]

    def _low_resolution(self, g: torch.Generator, u: torch.Tensor) -> torch.Tensor:
        n, h, w = u.shape
        zoom = _uniform(g, (n,), *self.lowres_zoom)
        chosen = _chosen(g, (n,), self.lowres_prob)
        out = u.clone()
        for i in torch.nonzero(chosen).flatten().tolist():  # a size per slice: F.interpolate takes one
            size = (max(2, round(h * float(zoom[i]))), max(2, round(w * float(zoom[i]))))
            small = F.interpolate(u[i][None, None], size=size, mode="area")
            out[i] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return out

    def _blur(self, g: torch.Generator, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[0]
        sigma = _uniform(g, (n, 1), *self.blur_sigma)
        radius = int(math.ceil(3 * self.blur_sigma[1]))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)[None]
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        identity = (offsets == 0).float().expand_as(kernel)
        kernel = torch.where(_chosen(g, (n, 1), self.blur_prob), kernel, identity)
        x = u[None]  # (1, n, H, W): one depthwise convolution, a kernel per (slice, modality)
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n)
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n)
        return x[0]

    def _noise(self, g: torch.Generator, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[0]
        std = _uniform(g, (n, 1, 1), 0.0, self.noise_std) * _chosen(g, (n, 1, 1), self.noise_prob)
        real = u + std * torch.randn(u.shape, generator=g)
        return torch.sqrt(real ** 2 + (std * torch.randn(u.shape, generator=g)) ** 2)

    def _lesion(self, g: torch.Generator, image: torch.Tensor, mask: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """The tumour's contrast and texture redrawn per chosen (slice, modality) of (B, K, H, W).

        Inside the brain, x = m + r with m the local mean (Gaussian of LESION_MEAN_SIGMA pixels over
        brain voxels only) and r the fine residual; in the tumour, m's distance from the brain's
        mean is multiplied by exp(N(0, lesion_contrast_log_std)) and r by U(lesion_texture), blended
        in with the tumour mask feathered over LESION_FEATHER_SIGMA pixels. The tissues around the
        tumour, the mask and the label are not touched.
        """
        if self.lesion_prob == 0:  # no draws either: runs without the step keep their random streams
            return image
        b, k, h, w = image.shape
        n = b * k
        x = image.reshape(n, h, w)
        inside = brain[:, None].expand(b, k, h, w).reshape(n, h, w).float()
        tumour = (mask > 0.5).float().expand(b, k, h, w).reshape(n, h, w) * inside
        chosen = _chosen(g, (n,), self.lesion_prob) & (tumour.flatten(1).amax(1) > 0)
        gain = torch.exp(self.lesion_contrast_log_std * torch.randn((n, 1, 1), generator=g))
        texture = _uniform(g, (n, 1, 1), *self.lesion_texture)
        if not bool(chosen.any()):
            return image
        local = _gaussian_smooth(x * inside, LESION_MEAN_SIGMA) / _gaussian_smooth(inside, LESION_MEAN_SIGMA).clamp_min(EPS)
        brain_mean = ((x * inside).sum((1, 2)) / inside.sum((1, 2)).clamp_min(1))[:, None, None]
        redrawn = brain_mean + gain * (local - brain_mean) + texture * (x - local)
        # feathered inward only: the tumour's rim blends, the tissue outside stays as rendered
        weight = _gaussian_smooth(tumour, LESION_FEATHER_SIGMA).clamp(0, 1) * tumour * chosen[:, None, None].float()
        return (x + weight * (redrawn - x)).reshape(b, k, h, w)

    def _intensities(self, g: torch.Generator, image: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Every (slice, modality) of (B, K, H, W): randomised in the brain, same brain mean / std, background 0."""
        b, k, h, w = image.shape
        x = image.reshape(b * k, h, w)
        inside = brain[:, None].expand(b, k, h, w).reshape(b * k, h, w).float()
        count = inside.sum((1, 2)).clamp_min(1)
        mean = (x * inside).sum((1, 2)) / count
        std = torch.sqrt((((x - mean[:, None, None]) * inside) ** 2).sum((1, 2)) / count)
        low = torch.where(inside > 0, x, torch.full_like(x, float("inf"))).amin((1, 2))
        high = torch.where(inside > 0, x, torch.full_like(x, float("-inf"))).amax((1, 2))
        low, high = torch.where(count > 1, low, 0), torch.where(count > 1, high, 1)
        u = ((x - low[:, None, None]) / (high - low).clamp_min(EPS)[:, None, None]).clamp(0, 1) * inside
        u = self._bias(g, self._curve(g, u) * inside)
        u = self._blur(g, self._low_resolution(g, u)) * inside
        u = self._noise(g, u) * inside
        new_mean = (u * inside).sum((1, 2)) / count
        new_std = torch.sqrt((((u - new_mean[:, None, None]) * inside) ** 2).sum((1, 2)) / count)
        usable = (new_std > EPS) & (count > 1)
        out = (u - new_mean[:, None, None]) / new_std.clamp_min(EPS)[:, None, None] * std[:, None, None] + mean[:, None, None]
        out = torch.where(usable[:, None, None], out, x) * inside
        return out.reshape(b, k, h, w)

    # ----------------------------------------------------------------------------- the batch

    def randomise(self, batch: dict, seed: int) -> dict:
        """The batch (collated: "image" (B, K, H, W), "mask" (B, 1, H, W), "label" (B,)) randomised."""
        g = torch.Generator().manual_seed(int(seed))
        image, mask = self._move(g, batch["image"].float(), batch["mask"].float())
        brain = (image != 0).any(dim=1)
        image = self._intensities(g, self._lesion(g, image, mask, brain), brain)
        mask = (mask > 0.5).float() * brain[:, None]  # tumour exists only where the brain does
        label = mask.flatten(1).any(1).to(batch["label"].dtype)
        return {**batch, "image": image.contiguous(), "mask": mask, "label": label}

    def __call__(self, items: list) -> dict:
        batch = default_collate(items)
        if not self.enabled:
            return batch
        return self.randomise(batch, int(torch.randint(2**31 - 1, (1,))))
