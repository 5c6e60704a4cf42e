"""The paper's numbers (Patel & Dolz, BraTS 2019, 2D axial, per-volume 3D DSC % / ASSD in voxels), keyed by
this bundle's run names, so each table cell of docs/results.md can show the number it is measured against.

Transcribed from the paper's Tables I-V (../shared reference copy of the paper); means only.
Run names: the plan's (`tools.experiment_plan`); 'cam.gradcampp' is the GradCAM++ read-out of the
'cam' run (the paper's second block); 'cmer_t1_t2' the proposed model trained on that pair.
"""

from __future__ import annotations

# Table II, four modalities: {run: {map: (DSC %, ASSD)}}
TABLE_II = {
    "cam": {"t1": (38.66, 12.25), "t2": (46.80, 10.83), "t1c": (36.27, 14.36), "flair": (41.58, 7.87),
            "fused": (49.64, 11.28)},
    "seam_scale": {"t1": (41.20, 11.86), "t2": (50.96, 9.58), "t1c": (40.91, 12.16), "flair": (41.32, 7.23),
                   "fused": (51.72, 11.13)},
    "seam_all": {"t1": (39.05, 10.74), "t2": (50.11, 7.58), "t1c": (43.38, 12.40), "flair": (43.04, 7.77),
                 "fused": (54.53, 11.00)},
    "cmer": {"t1": (47.56, 10.31), "t2": (57.07, 8.39), "t1c": (44.74, 11.62), "flair": (58.64, 7.29),
             "fused": (56.81, 10.80)},
    "cam.gradcampp": {"t1": (39.16, 12.19), "t2": (45.79, 10.92), "t1c": (37.23, 14.35), "flair": (43.36, 7.89),
                      "fused": (49.98, 11.41)},
    "seam_scale.gradcampp": {"t1": (41.94, 11.86), "t2": (51.34, 9.66), "t1c": (41.54, 12.18),
                             "flair": (42.56, 7.23), "fused": (51.78, 11.24)},
    "seam_all.gradcampp": {"t1": (39.08, 12.20), "t2": (50.56, 7.60), "t1c": (43.45, 12.45), "flair": (43.82, 7.82),
                           "fused": (54.64, 11.07)},
    "cmer.gradcampp": {"t1": (47.48, 10.39), "t2": (57.13, 8.42), "t1c": (44.73, 11.62), "flair": (59.73, 7.26),
                       "fused": (57.05, 10.83)},
    "full_supervision": {"t1": (71.40, 6.37), "t2": (79.60, 3.04), "t1c": (66.54, 5.27), "flair": (81.80, 2.30)},
}

# Table I, pairs, CAM block, DSC %: {pair: {method: (first modality, second modality, fused)}}.
# The baselines' single-modality numbers are their Table II ones; 'cmer' is the model trained on the pair.
TABLE_I = {
    "t1_t2": {"cam": (38.66, 46.80, 49.81), "seam_scale": (41.20, 50.96, 52.74), "seam_all": (39.05, 50.11, 54.23),
              "cmer": (47.11, 58.98, 59.72)},
    "t1c_flair": {"cam": (36.27, 41.58, 45.40), "seam_scale": (40.91, 41.32, 48.01),
                  "seam_all": (43.38, 43.04, 51.31), "cmer": (47.95, 53.05, 57.59)},
    "t1_flair": {"cam": (38.66, 41.58, 48.42), "seam_scale": (41.20, 41.32, 48.68), "seam_all": (39.05, 43.04, 49.82),
                 "cmer": (47.23, 56.20, 58.87)},
    "t1c_t2": {"cam": (36.27, 46.80, 47.44), "seam_scale": (40.91, 50.96, 51.53), "seam_all": (43.38, 50.11, 56.01),
               "cmer": (47.47, 57.90, 59.16)},
}

# Table III, the 'All' (four modalities) column, CAM block: {run: (fused DSC %, fused ASSD)}.
TABLE_III = {"kd_only": (46.44, 12.07), "kd_er": (54.37, 12.98), "er_cmer": (55.62, 11.10), "cmer": (56.81, 10.80)}

# Table IV, DeepLabv3-ResNet-50, proposed model trained on each pair, CAM block, fused DSC %.
TABLE_IV_PROPOSED = {"t1_t2": 60.78, "t1c_flair": 62.32, "t1_flair": 62.34, "t1c_t2": 60.92}

# Table V, r_u = FN/TP and r_o = FP/TP at 0.5: {run: {modality: (r_u, r_o)}}.
TABLE_V = {
    "seam_scale": {"t1": (3.65, 3.51), "t2": (1.59, 2.07), "t1c": (2.64, 2.40), "flair": (1.76, 2.17)},
    "seam_all": {"t1": (3.55, 2.49), "t2": (1.72, 1.38), "t1c": (2.58, 2.47), "flair": (1.31, 2.54)},
    "cmer": {"t1": (2.33, 1.93), "t2": (0.94, 0.76), "t1c": (2.42, 1.89), "flair": (0.73, 0.81)},
}


def table_ii(run: str, name: str, metric: str = "dsc") -> float | None:
    """The paper's Table II mean for `run` and map `name` (DSC % or ASSD), or None."""
    value = TABLE_II.get(run, {}).get(name)
    return None if value is None else value[0 if metric == "dsc" else 1]
