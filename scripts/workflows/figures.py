"""Figures: DSC-versus-threshold curves (paper Fig. 4), mask overlays (Fig. 5) and CAM
heat-map images for TensorBoard.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas and never touch
pyplot's global state, so they are safe in headless training runs; every PNG is written
through `scripts.common.atomic_path`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.ndimage import binary_erosion

from scripts.common import MODALITIES, atomic_path

MASK_RGB = (1.0, 0.15, 0.1)  # prediction fill
TRUTH_RGB = (0.2, 1.0, 0.2)  # ground-truth contour / fill


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    FigureCanvasAgg(fig)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    return out_png


def scale_to_unit(image, low_pct: float = 1.0, high_pct: float = 99.0) -> np.ndarray:
    """Robust [0, 1] display scaling between two percentiles."""
    image = _numpy(image).astype(np.float32)
    low, high = np.percentile(image, [low_pct, high_pct])
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def contour_of(mask) -> np.ndarray:
    """One-pixel inner boundary of a bool mask."""
    mask = _numpy(mask).astype(bool)
    return mask & ~binary_erosion(mask, border_value=0)


# ---------------------------------------------------------------------------------------
# Fig. 4 analogue


def plot_threshold_sweep(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png,
    title: str = "DSC versus binarisation threshold",
    marked_threshold: float | None = 0.5,
) -> Path:
    """One line per label: mean per-volume DSC (in %, given as 0..1) against threshold."""
    fig = Figure(figsize=(6.0, 4.0), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for label, (thresholds, dsc) in curves.items():
        ax.plot(_numpy(thresholds), 100.0 * _numpy(dsc), marker="o", markersize=3, label=label)
    if marked_threshold is not None:
        ax.axvline(marked_threshold, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("threshold")
    ax.set_ylabel("DSC (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------
# Fig. 5 analogue


def _grid_of_masks(masks: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """{row: {column: mask}}; a flat {name: mask} is one unnamed row."""
    if all(isinstance(v, Mapping) for v in masks.values()):
        return {row: dict(cols) for row, cols in masks.items()}
    return {"": dict(masks)}


def _background_for(name: str, images: Mapping[str, np.ndarray], default: str) -> tuple[str, np.ndarray]:
    key = name if name in images else default
    return key, images[key]


def _show_panel(ax, image: np.ndarray, mask: np.ndarray | None, truth: np.ndarray, title: str) -> None:
    ax.imshow(scale_to_unit(image), cmap="gray", interpolation="nearest")
    if mask is not None:
        rgba = np.zeros(mask.shape + (4,), dtype=np.float32)
        rgba[mask] = (*MASK_RGB, 0.45)
        ax.imshow(rgba, interpolation="nearest")
    else:  # ground-truth panel: filled truth
        rgba = np.zeros(truth.shape + (4,), dtype=np.float32)
        rgba[truth] = (*TRUTH_RGB, 0.45)
        ax.imshow(rgba, interpolation="nearest")
    if truth.any():
        ax.contour(truth.astype(float), levels=[0.5], colors=[TRUTH_RGB], linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def plot_overlays(
    images: Mapping[str, np.ndarray],
    masks: Mapping,
    truth,
    out_png,
    title: str | None = None,
    background: str | None = None,
) -> Path:
    """Binarised maps over the images with the ground-truth contour (green).

    `masks` is {name: (H,W) bool} (one row, e.g. modalities + 'fused') or
    {row (e.g. method): {name: (H,W) bool}} (rows = methods). A mask named after a modality
    is drawn on that modality's image; others (e.g. 'fused') on `background` (default:
    FLAIR if present, else the last image). The first column shows the ground truth.
    """
    images = {k: _numpy(v) for k, v in images.items()}
    truth = _numpy(truth).astype(bool)
    default = background or ("flair" if "flair" in images else list(images)[-1])
    grid = _grid_of_masks(masks)
    columns = list(dict.fromkeys(c for cols in grid.values() for c in cols))
    columns = [m for m in MODALITIES if m in columns] + [c for c in columns if c not in MODALITIES]
    n_rows, n_cols = len(grid), len(columns) + 1
    fig = Figure(figsize=(1.9 * n_cols, 2.0 * n_rows + (0.3 if title else 0)), dpi=110)
    for r, (row, cols) in enumerate(grid.items()):
        ax = fig.add_subplot(n_rows, n_cols, r * n_cols + 1)
        key, image = _background_for("", images, default)
        _show_panel(ax, image, None, truth, f"{row}\nground truth ({key})".strip())
        for c, name in enumerate(columns):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 2)
            if name not in cols:
                ax.set_axis_off()
                continue
            key, image = _background_for(name, images, default)
            label = name if key == name else f"{name} (on {key})"
            _show_panel(ax, image, _numpy(cols[name]).astype(bool), truth, label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------
# TensorBoard images


def cam_overlay(image, cam, truth=None, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """(H,W,3) uint8: grey image, CAM heat map blended in proportion to the CAM value (so a
    zero CAM leaves the image untouched), ground-truth contour in white."""
    gray = scale_to_unit(image)[..., None].repeat(3, axis=-1)
    cam = np.clip(_numpy(cam).astype(np.float32), 0.0, 1.0)
    heat = colormaps[cmap](cam)[..., :3]
    weight = alpha * cam[..., None]
    rgb = (1.0 - weight) * gray + weight * heat
    if truth is not None:
        rgb[contour_of(truth)] = 1.0
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def cam_overlay_grid(
    images, cams, truths=None, ncols: int | None = None, pad: int = 2, alpha: float = 0.6
) -> np.ndarray:
    """Tile N overlays (images, cams, truths: (N,H,W) or sequences) into one (H',W',3) uint8
    image, e.g. for `SummaryWriter.add_image(..., dataformats="HWC")`."""
    images, cams = [_numpy(i) for i in images], [_numpy(c) for c in cams]
    truths = [None] * len(images) if truths is None else [_numpy(t) for t in truths]
    if not (len(images) == len(cams) == len(truths)) or not images:
        raise ValueError("images, cams and truths must be non-empty and of equal length")
    tiles = [cam_overlay(i, c, t, alpha) for i, c, t in zip(images, cams, truths)]
    ncols = ncols or len(tiles)
    nrows = math.ceil(len(tiles) / ncols)
    h, w = tiles[0].shape[:2]
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), dtype=np.uint8)
    for idx, tile in enumerate(tiles):
        r, c = divmod(idx, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = tile
    return grid
