"""Tumour of a phantom subject: placement, irregular (optionally multifocal) core, mass
effect, necrosis / enhancing rim / cysts for high grade, oedema grown along white matter
that fades into normal tissue beyond its label, and the tissue fractions for the images."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from scripts.data.phantom.anatomy import (GRID_SHAPE_1MM, SLAB_SLICES_1MM, AnatomyWarp, _sample_template, _template_1mm,
                                    _template_for_spacing,
                                        grid_affine, grid_axes_mm)
from scripts.data.phantom.fields import SmoothRandomField, texture_field

# Tumour

WT_VOLUME_CM3 = (5.0, 150.0)  # whole tumour, log-uniform
LABEL_NECROTIC_CORE = 1  # necrosis (HGG) or non-enhancing tumour (LGG)
LABEL_OEDEMA = 2
LABEL_ENHANCING = 4
GRADES = ("HGG", "LGG")
GRADE_TUMOUR = {
    # core_fraction: core / whole tumour (LGG: less oedema); necrosis: fraction of core;
    # displaced: share of the core volume that pushes tissue (the rest infiltrates it).
    "HGG": {"core_fraction": (0.15, 0.45), "necrosis_fraction": (0.25, 0.6),
            "displaced_fraction": (0.5, 0.9)},
    "LGG": {"core_fraction": (0.55, 0.85), "necrosis_fraction": (0.0, 0.0),
            "displaced_fraction": (0.25, 0.6)},
}
BLOB_COUNT = (1, 4)  # merged ellipsoids, inclusive range
BLOB_OFFSET = 0.5  # blob centres within this fraction of the core radius
BLOB_AXIS_LOG_STD = 0.22
SHAPE_ROUGHNESS = (0.2, 0.4)  # smooth-noise perturbation of the distance, x core radius
SHAPE_CORRELATION = 0.7  # noise correlation length, x core radius
RIM_MIN_MM = 2.0  # thinnest enhancing rim
NECROSIS_ROUGHNESS = 0.3  # irregularity of the necrosis / rim boundary, x core radius
# Oedema travels along white matter: relative speed per tissue for the geodesic distance.
OEDEMA_SPEED = {"wm": 1.0, "gm": 0.1, "csf": 0.02}
OEDEMA_MIN_SPEED = 0.02
OEDEMA_OUTSIDE_BRAIN_SPEED = 1e-3
OEDEMA_GRID_MM = 2.0  # geodesic distance is computed on a grid at least this coarse
OEDEMA_ROUGHNESS = 0.25
OEDEMA_CORRELATION_MM = 12.0
OEDEMA_EDGE_DILUTION = 0.35  # oedema fraction falls to 1 - this at its outer edge
CSF_EXCLUDED_FROM_OEDEMA = 0.5  # voxels mostly CSF are never oedema
# Oedema does not stop at its label: infiltration fades into normal tissue (exponentially
# in the white-matter-weighted distance, from the label edge's fraction).
OEDEMA_HALO_MM = (2.0, 5.0)
# Oedema is patchy: its water fraction varies within the label (infiltration, sparing).
OEDEMA_PATCHINESS = 0.5
OEDEMA_PATCH_MM = (3.0, 8.0)
# Label 1 of high grade mixes necrosis with non-enhancing tumour; share of necrosis.
NECROSIS_SHARE = (0.6, 0.9)
NECROSIS_SHARE_TEXTURE_MM = (3.0, 8.0)
NECROSIS_SHARE_SPREAD = 0.5
CYST_SUBJECT_SHARE = {"HGG": 0.15, "LGG": 0.15}  # subjects with cysts in the core
CYST_CORE_SHARE = (0.03, 0.10)  # share of the core that is cystic, when present
CYST_TEXTURE_MM = (4.0, 8.0)
MULTIFOCAL_SHARE = 0.15  # subjects with a second focus
SATELLITE_DISTANCE = (1.4, 2.2)  # x core radius
SATELLITE_SIZE = (0.35, 0.6)  # x core radius
PARTIAL_VOLUME_SIGMA_MM = 0.6  # softening of tumour compartments for the images
# Tumour centre: parenchyma, supratentorial, off the midline, deep enough.
CENTRE_MIN_PARENCHYMA = 0.85
CENTRE_MIN_Z_MM = -15.0
CENTRE_MIN_ABS_X_MM = 12.0
CENTRE_DEPTH_MARGIN_MM = 6.0
EXTENT_POLAR_STEPS = 24  # directions at which the core's extent is measured
EXTENT_AZIMUTH_STEPS = 48
BOX_RADIUS_FACTOR = 2.2  # tumour box half-size = factor * WT radius + margin
BOX_MARGIN_MM = 12.0
CENTRE_PROPOSALS = 20000
# Random fields span the whole field of view, so a seed gives the same field at any spacing.
FOV_LOWER = (-0.5, -0.5, -0.5)
FOV_UPPER = tuple(n - 0.5 for n in GRID_SHAPE_1MM)



# ---------------------------------------------------------------------------------------
# Tumour


def equivalent_radius_mm(volume_mm3: float) -> float:
    return (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)


def draw_tumour_plan(rng: np.random.Generator, grade: str, spacing: float) -> dict:
    """Volumes (in voxels of this grid) and shape parameters of one tumour."""
    ranges = GRADE_TUMOUR[grade]
    voxel_mm3 = spacing**3
    wt_mm3 = 1000.0 * math.exp(rng.uniform(*np.log(WT_VOLUME_CM3)))
    lo, hi = (math.ceil(1000.0 * WT_VOLUME_CM3[0] / voxel_mm3), math.floor(1000.0 * WT_VOLUME_CM3[1] / voxel_mm3))
    wt_voxels = int(np.clip(round(wt_mm3 / voxel_mm3), lo, hi))
    core_voxels = max(1, int(round(wt_voxels * rng.uniform(*ranges["core_fraction"]))))
    return {
        "grade": grade,
        "wt_voxels": wt_voxels,
        "core_voxels": core_voxels,
        "necrosis_fraction": float(rng.uniform(*ranges["necrosis_fraction"])),
        "displaced_fraction": float(rng.uniform(*ranges["displaced_fraction"])),
        "wt_radius_mm": equivalent_radius_mm(wt_voxels * voxel_mm3),
        "core_radius_mm": equivalent_radius_mm(core_voxels * voxel_mm3),
    }


def choose_tumour_centre(rng: np.random.Generator, anatomy: dict, spacing: float, core_radius_mm: float,
                         warp: AnatomyWarp) -> np.ndarray:
    """Voxel index of the tumour centre: deep, supratentorial, off-midline parenchyma,
    drawn with probability rising with the white-matter fraction (gliomas are mostly
    white-matter lesions).

    Rejection sampling of points in millimetres, judged on the warped 1 mm template with
    every random number drawn up front: a seed gives the same centre at any spacing."""
    proposals = (rng.uniform(0.0, 1.0, (CENTRE_PROPOSALS, 3)) * np.array(GRID_SHAPE_1MM, dtype=float) - 0.5).T
    accept = rng.random(CENTRE_PROPOSALS)
    coords = warp.template_coords(proposals.astype(np.float32), warp.elastic.at_points(proposals))
    template = _template_1mm()
    at = _sample_template(template, ("gm", "wm", "mask", "depth"), coords)
    midline_mm = coords[0] + template["origin"][0]  # template x index -> MNI x (1 mm voxels)
    z_world = proposals[2] + grid_affine(1.0)[2, 3]
    parenchyma = ((at["gm"] + at["wm"] >= CENTRE_MIN_PARENCHYMA * np.maximum(at["mask"], 0.5)) & (at["mask"] > 0.9)
                  & (np.abs(midline_mm) >= CENTRE_MIN_ABS_X_MM) & (z_world >= CENTRE_MIN_Z_MM))
    weight = (at["wm"].astype(np.float64) ** 2 + 1e-3) / 1.001
    margin = 0.6 * core_radius_mm + CENTRE_DEPTH_MARGIN_MM
    while True:
        chosen = np.flatnonzero(parenchyma & (at["depth"] >= margin) & (accept < weight))
        if chosen.size or margin < 1.0:
            break
        margin /= 2.0  # small brains: relax the depth demand rather than fail
    if chosen.size == 0:
        raise RuntimeError("no brain parenchyma found for a tumour centre")
    point = proposals[:, chosen[0]]
    shape = np.array(anatomy["mask"].shape)
    return np.clip(np.rint((point - (spacing - 1.0) / 2.0) / spacing).astype(int), 0, shape - 1)


def tumour_box(centre_vox: np.ndarray, half_size_mm: float, spacing: float, shape) -> tuple[slice, ...]:
    """Cube around the centre, clipped to the grid: all tumour work happens inside it."""
    half = int(math.ceil(half_size_mm / spacing))
    return tuple(slice(max(0, c - half), min(n, c + half + 1)) for c, n in zip(centre_vox, shape))


def core_extent_by_direction(core: np.ndarray, centre_index: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm) from the centre to where the core is first left, on a grid of
    directions (polar x azimuth), smoothed over neighbouring directions."""
    polar = (np.arange(EXTENT_POLAR_STEPS) + 0.5) * np.pi / EXTENT_POLAR_STEPS
    azimuth = np.arange(EXTENT_AZIMUTH_STEPS) * 2.0 * np.pi / EXTENT_AZIMUTH_STEPS
    directions = np.stack([np.sin(polar)[:, None] * np.cos(azimuth)[None, :],
                           np.sin(polar)[:, None] * np.sin(azimuth)[None, :],
                           np.cos(polar)[:, None] * np.ones_like(azimuth)[None, :]])
    step_mm = spacing / 2.0
    radii = np.arange(0.0, np.linalg.norm(core.shape) * spacing, step_mm)
    points = (centre_index.reshape(3, 1, 1, 1)
              + directions[..., None] * (radii / spacing).reshape(1, 1, 1, -1))
    inside = ndi.map_coordinates(core.astype(np.uint8), points.reshape(3, -1), order=0, cval=0)
    inside = inside.reshape(points.shape[1:]).astype(bool)
    first_exit = np.argmin(inside, axis=-1)  # index of the first sample outside the core
    extent = first_exit * step_mm
    return ndi.gaussian_filter(extent, 1.0, mode=("nearest", "wrap")).astype(np.float32)


def core_extent_at(points_mm: np.ndarray, centre_mm: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Core extent (mm) in the direction of each point, interpolated between directions."""
    rel = points_mm - centre_mm.reshape((3,) + (1,) * (points_mm.ndim - 1))
    r = np.sqrt(np.sum(rel**2, axis=0))
    polar = np.arccos(np.clip(rel[2] / np.maximum(r, 1e-6), -1.0, 1.0))
    azimuth = np.mod(np.arctan2(rel[1], rel[0]), 2.0 * np.pi)
    index = np.stack([polar / np.pi * EXTENT_POLAR_STEPS - 0.5,
                      azimuth / (2.0 * np.pi) * EXTENT_AZIMUTH_STEPS])
    # Pad azimuth by one column so interpolation wraps around 2 pi.
    padded = np.concatenate([extent, extent[:, :1]], axis=1)
    return ndi.map_coordinates(padded, index, order=1, mode="nearest").astype(np.float32)


def mass_effect_source(points_mm: np.ndarray, centre_mm: np.ndarray, core_extent_mm: np.ndarray,
                       displaced_fraction: float, outer_radius_mm: float) -> np.ndarray:
    """Where each output point takes its tissue from when the core pushes outwards.

    Incompressible tissue around an inserted ball of radius R moves from r0 to r with
    r^3 = r0^3 + R^3, so the pull-back is r0 = (r^3 - R^3)^(1/3). Here R follows the
    core's shape, R = k * extent(direction) with k^3 = `displaced_fraction` (the share of
    the core that displaces tissue; the rest infiltrates it), so the collapsed region
    always lies inside the core. The displacement is kept in full up to the core's edge
    and faded out (cos^2) by `outer_radius_mm`, so far tissue and the skull do not move.
    """
    shape = (3,) + (1,) * (points_mm.ndim - 1)
    rel = points_mm - centre_mm.reshape(shape)
    r = np.sqrt(np.sum(rel**2, axis=0))
    pushed = np.cbrt(displaced_fraction) * core_extent_mm
    r0 = np.cbrt(np.maximum(r**3 - pushed**3, 0.0))
    fade = np.clip((r - core_extent_mm) / np.maximum(outer_radius_mm - core_extent_mm, 1e-6), 0.0, 1.0)
    taper = np.cos(0.5 * np.pi * fade) ** 2
    r_src = r - (r - r0) * taper
    ratio = np.where(r > 0, r_src / np.maximum(r, 1e-6), 0.0)
    return (centre_mm.reshape(shape) + rel * ratio).astype(np.float32)


def apply_mass_effect(anatomy: dict, warp: AnatomyWarp, spacing: float, box: tuple[slice, ...],
                      centre_mm: np.ndarray, core: np.ndarray, plan: dict) -> None:
    """Resample GM / WM inside the box from displaced positions (in place). The brain
    mask is left alone: the skull does not move, so pushed tissue effaces sulci and
    compresses the ventricles instead."""
    axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    centre_index = np.array([(c - a[0]) / spacing for c, a in zip(centre_mm, axes)])
    extent_by_direction = core_extent_by_direction(core, centre_index, spacing)
    outer = BOX_RADIUS_FACTOR * plan["wt_radius_mm"] + BOX_MARGIN_MM
    # Elastic displacement at the (off-grid) source points is interpolated from the
    # smooth field sampled on the box grid.
    elastic_box = warp.elastic.on_grid(axes)
    template = _template_for_spacing(spacing)
    gm, wm, mask = anatomy["gm"][box], anatomy["wm"][box], anatomy["mask"][box]
    chunk = max(1, int(SLAB_SLICES_1MM / spacing))  # x-slabs bound the memory at 1 mm
    for x0 in range(0, len(axes[0]), chunk):
        part = slice(x0, x0 + chunk)
        points = np.stack(np.meshgrid(axes[0][part], axes[1], axes[2], indexing="ij"))
        extent = core_extent_at(points, centre_mm, extent_by_direction)
        source = mass_effect_source(points, centre_mm, extent, plan["displaced_fraction"], outer)
        box_index = [(source[i] - axes[i][0]) / spacing for i in range(3)]
        elastic = np.stack([ndi.map_coordinates(elastic_box[i], box_index, order=1, mode="nearest")
                            for i in range(3)])
        sampled = _sample_template(template, ("gm", "wm"), warp.template_coords(source, elastic))
        total = np.maximum(sampled["gm"] + sampled["wm"], 1e-6)
        squeeze = np.minimum(1.0, mask[part] / total)  # pushed against the skull: no overflow
        gm[part] = sampled["gm"] * squeeze
        wm[part] = sampled["wm"] * squeeze


def smallest(values: np.ndarray, eligible: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the `count` eligible voxels with the smallest values."""
    idx = np.flatnonzero(eligible)
    count = min(count, idx.size)
    out = np.zeros(values.shape, bool)
    if count <= 0:
        return out
    chosen = idx[np.argpartition(values.ravel()[idx], count - 1)[:count]]
    out.ravel()[chosen] = True
    return out


def smallest_attached(values: np.ndarray, eligible: np.ndarray, count: int, seed: np.ndarray,
                      attempts: int = 4) -> np.ndarray:
    """Like `smallest`, but only voxels connected to `seed` (oedema islands detached from
    the core by noise are dropped and replaced by the next-smallest attached voxels)."""
    wanted = count
    for _ in range(attempts):
        chosen = smallest(values, eligible, wanted)
        labelled, _ = ndi.label(chosen | seed)
        attached = np.isin(labelled, np.unique(labelled[seed & (labelled > 0)])) & chosen
        deficit = count - int(attached.sum())
        if deficit <= 0 or wanted >= int(eligible.sum()):
            break
        wanted += deficit
    return smallest(np.where(attached, values, np.inf), attached, count)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def core_level_set(rng: np.random.Generator, axes: Sequence[np.ndarray], centre_mm: np.ndarray,
                   core_radius_mm: float) -> np.ndarray:
    """Distance-like function (mm) whose sub-level sets are irregular tumour cores: the
    distance to the nearest of a few random ellipsoid centres, perturbed by smooth noise."""
    points = np.stack(np.meshgrid(*axes, indexing="ij"))
    n_blobs = int(rng.integers(BLOB_COUNT[0], BLOB_COUNT[1] + 1))
    level = np.full(points.shape[1:], np.inf, np.float32)
    for b in range(n_blobs):
        direction = rng.standard_normal(3)
        offset = 0.0 if b == 0 else BLOB_OFFSET * core_radius_mm * rng.uniform(0.3, 1.0)
        blob_centre = centre_mm + offset * direction / np.linalg.norm(direction)
        inverse_axes = np.exp(-rng.normal(0.0, BLOB_AXIS_LOG_STD, 3))
        frame = (_random_rotation(rng).T * inverse_axes[:, None]).astype(np.float32)
        rel = points - blob_centre.astype(np.float32).reshape(3, 1, 1, 1)
        level = np.minimum(level, np.sqrt(np.sum(np.tensordot(frame, rel, axes=1) ** 2, axis=0)))
    noise = SmoothRandomField(rng, FOV_LOWER, FOV_UPPER, SHAPE_CORRELATION * core_radius_mm).on_grid(axes)[0]
    level = level + rng.uniform(*SHAPE_ROUGHNESS) * core_radius_mm * noise
    if rng.random() < MULTIFOCAL_SHARE:
        # A second, smaller focus nearby: its distance is scaled up so that it fills only
        # a fraction of the core's radius at the same level.
        direction = rng.standard_normal(3)
        satellite = centre_mm + rng.uniform(*SATELLITE_DISTANCE) * core_radius_mm * direction / np.linalg.norm(direction)
        rel = points - satellite.astype(np.float32).reshape(3, 1, 1, 1)
        level = np.minimum(level, np.sqrt(np.sum(rel**2, axis=0)) / np.float32(rng.uniform(*SATELLITE_SIZE)))
    return level


def geodesic_distance(source: np.ndarray, cost: np.ndarray, step_mm: float) -> np.ndarray:
    """Shortest-path distance (mm x cost) from `source` over an 18-neighbour voxel graph,
    by repeated min-plus relaxation (Bellman-Ford) until nothing changes."""
    dist = np.where(source, 0.0, np.inf).astype(np.float32)
    edges = []
    for off in np.ndindex(3, 3, 3):
        off = np.array(off) - 1
        if 0 < np.abs(off).sum() <= 2:
            dst = tuple(slice(max(o, 0), n + min(o, 0)) for o, n in zip(off, cost.shape))
            src = tuple(slice(max(-o, 0), n + min(-o, 0)) for o, n in zip(off, cost.shape))
            weight = step_mm * float(np.linalg.norm(off)) * 0.5 * (cost[src] + cost[dst])
            edges.append((dst, src, weight))
    for _ in range(4 * sum(cost.shape)):
        changed = False
        for dst, src, weight in edges:
            candidate = dist[src] + weight
            target = dist[dst]
            better = candidate < target
            if better.any():
                target[better] = candidate[better]
                changed = True
        if not changed:
            break
    return dist


def oedema_distance(core: np.ndarray, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                    mask: np.ndarray, spacing: float) -> np.ndarray:
    """White-matter-weighted geodesic distance from the core, on a grid no finer than
    OEDEMA_GRID_MM (the distance is smooth; the fine grid only costs time)."""
    factor = max(1, int(round(OEDEMA_GRID_MM / spacing)))
    speed = (OEDEMA_SPEED["wm"] * wm + OEDEMA_SPEED["gm"] * gm + OEDEMA_SPEED["csf"] * csf)
    speed = speed / np.maximum(mask, 1e-3)
    speed = np.where(mask > 0.5, np.maximum(speed, OEDEMA_MIN_SPEED), OEDEMA_OUTSIDE_BRAIN_SPEED)
    cost = 1.0 / speed
    if factor > 1:
        cost = ndi.uniform_filter(cost, factor)[::factor, ::factor, ::factor]
        source = ndi.maximum_filter(core, factor)[::factor, ::factor, ::factor]
    else:
        source = core
    dist = geodesic_distance(source, cost.astype(np.float32), spacing * factor)
    if factor > 1:
        fine = np.meshgrid(*[np.arange(n) / factor for n in core.shape], indexing="ij")
        dist = ndi.map_coordinates(np.where(np.isfinite(dist), dist, 1e6).astype(np.float32),
                                   fine, order=1, mode="nearest")
    return np.where(core, 0.0, dist).astype(np.float32)


def same_hemisphere(midline_mm: np.ndarray, centre_index: Sequence[int]) -> np.ndarray:
    """Voxels whose anatomy comes from the centre's cerebral hemisphere (the falx stops
    a solid tumour)."""
    return midline_mm * np.sign(midline_mm[tuple(centre_index)]) > 0


def grow_core(rng: np.random.Generator, allowed: np.ndarray, axes: Sequence[np.ndarray],
              centre_mm: np.ndarray, plan: dict) -> tuple[np.ndarray, np.ndarray]:
    """Tumour core (bool, box grid) of the planned size within `allowed`, and its
    level-set function."""
    level = core_level_set(rng, axes, centre_mm, plan["core_radius_mm"])
    core = smallest(level, allowed, plan["core_voxels"])
    labelled, n_parts = ndi.label(core)
    if n_parts <= 1:
        return core, level
    # Keep the main focus and any part big enough to be a second focus (a satellite);
    # small islands detached by the noise are dropped.
    sizes = np.bincount(labelled.ravel())[1:]
    seed_label = labelled.ravel()[np.argmin(np.where(core, level, np.inf))]
    keep = [seed_label] + [i + 1 for i, n in enumerate(sizes) if n >= 0.1 * plan["core_voxels"]]
    return np.isin(labelled, keep), level


def paint_tumour(rng: np.random.Generator, anatomy: dict, plan: dict, box: tuple[slice, ...],
                 spacing: float, core: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and tumour-tissue fractions inside the box, around a given core.

    Fractions: "necrosis", "tumour" (non-enhancing), "enhancing", "cyst", "oedema"; they
    sum to at most 1 per voxel, the rest is the voxel's normal tissue."""
    axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    gm, wm, mask = anatomy["gm"][box], anatomy["wm"][box], anatomy["mask"][box]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    brain = mask >= 0.5

    labels = np.zeros(core.shape, np.uint8)
    hard: dict[str, np.ndarray] = {}
    if plan["grade"] == "HGG":
        depth_in_core = ndi.distance_transform_edt(core, sampling=spacing)
        interior = core & (depth_in_core > max(RIM_MIN_MM, spacing))
        rim_noise = SmoothRandomField(rng, FOV_LOWER, FOV_UPPER, SHAPE_CORRELATION * plan["core_radius_mm"]).on_grid(axes)[0]
        necrosis_level = level + NECROSIS_ROUGHNESS * plan["core_radius_mm"] * rim_noise
        n_necrosis = max(1, int(round(plan["necrosis_fraction"] * core.sum())))
        centre = smallest(necrosis_level, interior, n_necrosis)
        labels[centre] = LABEL_NECROTIC_CORE
        labels[core & ~centre] = LABEL_ENHANCING
        # Label 1 of high grade is necrosis mixed with non-enhancing tumour.
        share = rng.uniform(*NECROSIS_SHARE)
        mixing = texture_field(rng, core.shape, spacing, NECROSIS_SHARE_TEXTURE_MM, (1.0, 1.0))
        necrosis_share = np.clip(share + NECROSIS_SHARE_SPREAD * mixing, 0.0, 1.0)
        hard = {"necrosis": centre * necrosis_share, "tumour": centre * (1.0 - necrosis_share),
                "enhancing": (core & ~centre).astype(np.float32)}
    else:
        labels[core] = LABEL_NECROTIC_CORE
        hard = {"tumour": core.astype(np.float32)}
    if rng.random() < CYST_SUBJECT_SHARE[plan["grade"]]:
        # Cysts: fluid pockets inside label 1 (labelled as core, as in BraTS).
        pockets = texture_field(rng, core.shape, spacing, CYST_TEXTURE_MM, (1.0, 0.5))
        inside = labels == LABEL_NECROTIC_CORE
        if inside.any():
            cut = np.quantile(pockets[inside], 1.0 - rng.uniform(*CYST_CORE_SHARE))
            cyst = (inside & (pockets >= cut)).astype(np.float32)
            hard = {name: f * (1.0 - cyst) for name, f in hard.items()}
            hard["cyst"] = cyst

    distance = oedema_distance(core, gm, wm, csf, mask, spacing)
    texture = SmoothRandomField(rng, FOV_LOWER, FOV_UPPER, OEDEMA_CORRELATION_MM).on_grid(axes)[0]
    rough_distance = distance * np.maximum(1.0 + OEDEMA_ROUGHNESS * texture, 0.2)
    eligible = brain & ~core & (csf < CSF_EXCLUDED_FROM_OEDEMA * np.maximum(mask, 1e-3)) & (distance < 1e5)
    oedema = smallest_attached(rough_distance, eligible, plan["wt_voxels"] - int(core.sum()), core)
    labels[oedema] = LABEL_OEDEMA

    # Partial volume: soften the hard compartments. Oedema thins out towards its edge and
    # goes on beyond its label, fading into normal tissue (infiltration).
    sigma = PARTIAL_VOLUME_SIGMA_MM / spacing
    soft = {name: ndi.gaussian_filter(f, sigma) for name, f in hard.items()}
    edge = float(rough_distance[oedema].max()) if oedema.any() else 1.0
    relative = np.clip(rough_distance / max(edge, 1e-6), 0.0, 1.0)
    oedema_fraction = np.where(oedema, 1.0 - OEDEMA_EDGE_DILUTION * relative, 0.0)
    halo = rng.uniform(*OEDEMA_HALO_MM)
    beyond = eligible & ~oedema & (rough_distance > edge)
    oedema_fraction = np.where(beyond, (1.0 - OEDEMA_EDGE_DILUTION) * np.exp(-(rough_distance - edge) / halo),
                               oedema_fraction)
    patches = texture_field(rng, core.shape, spacing, OEDEMA_PATCH_MM, (1.0, 1.0))
    oedema_fraction = oedema_fraction * np.clip(1.0 + OEDEMA_PATCHINESS * patches, 0.3, 1.0)
    soft["oedema"] = ndi.gaussian_filter(oedema_fraction.astype(np.float32), sigma)
    total = sum(soft.values())
    norm = np.maximum(total, 1.0)
    soft = {name: np.where(brain, f / norm, 0.0).astype(np.float32) for name, f in soft.items()}
    return labels, soft


def simulate_tumour(rng: np.random.Generator, anatomy: dict, warp: AnatomyWarp, grade: str,
                    spacing: float) -> tuple[np.ndarray, tuple[slice, ...], dict, list[int]]:
    """Place, grow and paint one tumour; pushes the anatomy aside (in place).

    Returns the full-grid label map, the box holding the tumour, the tumour-tissue
    fractions inside that box and the centre voxel."""
    plan = draw_tumour_plan(rng, grade, spacing)
    centre_vox = choose_tumour_centre(rng, anatomy, spacing, plan["core_radius_mm"], warp)
    centre_mm = np.array([grid_axes_mm(spacing)[i][c] for i, c in enumerate(centre_vox)], np.float32)
    box = tumour_box(centre_vox, BOX_RADIUS_FACTOR * plan["wt_radius_mm"] + BOX_MARGIN_MM,
                     spacing, anatomy["mask"].shape)
    box_axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    local_centre = [c - b.start for c, b in zip(centre_vox, box)]
    allowed = (anatomy["mask"][box] >= 0.5) & same_hemisphere(anatomy["midline_mm"][box], local_centre)
    core, level = grow_core(rng, allowed, box_axes, centre_mm, plan)
    apply_mass_effect(anatomy, warp, spacing, box, centre_mm, core, plan)
    box_labels, box_fractions = paint_tumour(rng, anatomy, plan, box, spacing, core, level)
    seg = np.zeros(anatomy["mask"].shape, np.uint8)
    seg[box] = box_labels
    return seg, box, box_fractions, centre_vox.tolist()
