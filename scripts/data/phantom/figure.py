"""The README figure: one row per subject, the four modalities and the label map on an
axial slice through the tumour."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from scripts.common import atomic_path
from scripts.data.phantom.render import MODALITY_FILES
from scripts.data.phantom.tumour import LABEL_ENHANCING, LABEL_NECROTIC_CORE, LABEL_OEDEMA

LABEL_COLOURS = {LABEL_NECROTIC_CORE: (0.9, 0.15, 0.1), LABEL_OEDEMA: (0.2, 0.85, 0.2),
                 LABEL_ENHANCING: (1.0, 0.9, 0.1)}
LABEL_NAMES = {LABEL_NECROTIC_CORE: "1 necrotic / non-enh. core", LABEL_OEDEMA: "2 oedema",
               LABEL_ENHANCING: "4 enhancing"}
FIGURE_TITLES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}
DISPLAY_PERCENTILES = (0.5, 99.5)


def tumour_slice(seg: np.ndarray) -> int:
    """Axial index through the whole tumour's centre of mass (middle slice if none)."""
    if not (seg > 0).any():
        return seg.shape[2] // 2
    return int(round(ndi.center_of_mass(seg > 0)[2]))


def _display(image2d: np.ndarray) -> np.ndarray:
    """RAS array slice (x, y) -> picture rows = anterior at the top, patient left on the left."""
    return np.flipud(image2d.T)


def plot_subjects(subjects: Sequence[dict], out_png, names: Sequence[str] | None = None) -> Path:
    """One row per subject: T1, T1c, T2, FLAIR and the label map on an axial slice
    through the tumour centre. `subjects` hold the arrays of `generate_subject`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(names) if names is not None else [f"subject {i}" for i in range(len(subjects))]
    fig = Figure(figsize=(15, 3.3 * len(subjects)), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(subjects), 5, squeeze=False)
    for row, (arrays, name) in enumerate(zip(subjects, names)):
        z = tumour_slice(arrays["seg"])
        brain_rows = np.flatnonzero(arrays["t1"][:, :, z].any(axis=1))
        brain_cols = np.flatnonzero(arrays["t1"][:, :, z].any(axis=0))
        crop = (slice(max(brain_rows[0] - 3, 0), brain_rows[-1] + 4),
                slice(max(brain_cols[0] - 3, 0), brain_cols[-1] + 4)) if brain_rows.size else (slice(None),) * 2
        for col, modality in enumerate(MODALITY_FILES):
            image = arrays[modality][:, :, z][crop].astype(np.float32)
            brain = arrays[modality] > 0
            # Display window over brain voxels, as a radiologist's viewer would set it.
            low, top = np.percentile(arrays[modality][brain], DISPLAY_PERCENTILES) if brain.any() else (0, 1)
            ax = axes[row, col]
            ax.imshow(_display(np.where(image > 0, image, low)), cmap="gray", vmin=low, vmax=top,
                      interpolation="nearest")
            ax.set_title(f"{name}  {FIGURE_TITLES[modality]}" if col == 0 else FIGURE_TITLES[modality],
                         color="white", fontsize=10)
        seg = arrays["seg"][:, :, z][crop]
        base = arrays["flair"][:, :, z][crop].astype(np.float32)
        base = 0.6 * base / max(float(base.max()), 1.0)
        rgb = np.repeat(base[..., None], 3, axis=2)
        for label, colour in LABEL_COLOURS.items():
            rgb[seg == label] = colour
        ax = axes[row, 4]
        ax.imshow(np.flipud(rgb.transpose(1, 0, 2)), interpolation="nearest")
        ax.set_title("labels (seg)", color="white", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0.06 / len(subjects), 1, 1))
    fig.legend(handles=[Patch(color=c, label=LABEL_NAMES[k]) for k, c in LABEL_COLOURS.items()],
               loc="lower center", ncol=3, fontsize=9, frameon=False, labelcolor="white")
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return out_png
