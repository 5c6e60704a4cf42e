"""Tissue relaxation, sequences and signal equations of the phantom.

Relaxation times (ms) and proton densities (relative to water) are drawn per subject
from ranges per field strength. Sources (see docs/phantom.md for the full list):
- normal tissue: Stanisz et al., MRM 54:507 (2005) (WM / GM T1, T2 at 1.5 T and 3 T);
  Wansapura et al., JMRI 9:531 (1999) (3 T); Rooney et al., MRM 57:308 (2007) (CSF T1
  ~4.3 s, nearly field-independent); water content WM ~0.69-0.71, GM ~0.80-0.83
  (Tofts, Quantitative MRI of the Brain, 2003; Neeb et al., NeuroImage 31:1156 (2006)).
- glioma: long T1 and T2 with a raised proton density (more free water); at 3 T,
  T1 ~1.8-3.2 s and T2 ~115-225 ms in tissue of high tumour-cell density (MP2RAGE and
  multi-echo relaxometry), peritumoural oedema between NAWM and tumour (synthetic-MRI
  relaxometry: Blystad et al., Sci Rep 10:17750 (2020); MAGiC in gliomas, Sci Rep
  12:20177 (2022)); necrosis: proteinaceous fluid, T1 and T2 longer than solid tumour
  but well below CSF; cysts: close to CSF.
- contrast agent: 1/T1_post = 1/T1_pre + r1 C with r1 ~4.3 /(mM s) at 1.5 T and ~3.7 at
  3 T for gadopentetate-like agents in plasma (Rohrer et al., Invest Radiol 40:715 (2005)).

Weighting per subject (clinical protocols vary; BraTS mixes them): T1 and T1c are each a
2D spin echo or a 3D magnetisation-prepared gradient echo (MPRAGE); T2 a turbo spin echo;
FLAIR an inversion recovery with the inversion time set to null CSF.
"""

from __future__ import annotations

import math

import numpy as np

FIELD_STRENGTHS = (1.5, 3.0)

# (low, high) per tissue and property; PD as a fraction of pure water.
TISSUE_PROPERTIES: dict[float, dict[str, dict[str, tuple[float, float]]]] = {
    1.5: {
        "wm": {"t1": (780.0, 900.0), "t2": (70.0, 80.0), "pd": (0.68, 0.71)},
        "gm": {"t1": (1100.0, 1250.0), "t2": (90.0, 100.0), "pd": (0.79, 0.83)},
        "csf": {"t1": (4000.0, 4500.0), "t2": (1500.0, 2000.0), "pd": (0.98, 1.0)},
        "oedema": {"t1": (1930.0, 2200.0), "t2": (245.0, 310.0), "pd": (0.83, 0.89)},
        "tumour": {"t1": (2000.0, 2400.0), "t2": (290.0, 380.0), "pd": (0.82, 0.88)},
        "necrosis": {"t1": (2200.0, 2600.0), "t2": (380.0, 515.0), "pd": (0.78, 0.84)},
        "enhancing": {"t1": (1300.0, 1600.0), "t2": (140.0, 180.0), "pd": (0.78, 0.84)},
        "cyst": {"t1": (2800.0, 3800.0), "t2": (600.0, 1200.0), "pd": (0.93, 0.98)},
        "wmh": {"t1": (950.0, 1150.0), "t2": (100.0, 125.0), "pd": (0.74, 0.79)},
        "vessel": {"t1": (1300.0, 1500.0), "t2": (150.0, 250.0), "pd": (0.80, 0.85)},
    },
    3.0: {
        "wm": {"t1": (850.0, 1100.0), "t2": (65.0, 80.0), "pd": (0.68, 0.71)},
        "gm": {"t1": (1350.0, 1800.0), "t2": (85.0, 100.0), "pd": (0.79, 0.83)},
        "csf": {"t1": (4000.0, 4500.0), "t2": (1400.0, 2000.0), "pd": (0.98, 1.0)},
        "oedema": {"t1": (2090.0, 2420.0), "t2": (230.0, 290.0), "pd": (0.83, 0.89)},
        "tumour": {"t1": (2150.0, 2600.0), "t2": (270.0, 360.0), "pd": (0.82, 0.88)},
        "necrosis": {"t1": (2350.0, 2800.0), "t2": (360.0, 490.0), "pd": (0.78, 0.84)},
        "enhancing": {"t1": (1800.0, 2200.0), "t2": (130.0, 170.0), "pd": (0.78, 0.84)},
        "cyst": {"t1": (3300.0, 4200.0), "t2": (600.0, 1200.0), "pd": (0.93, 0.98)},
        "wmh": {"t1": (1150.0, 1400.0), "t2": (95.0, 120.0), "pd": (0.74, 0.79)},
        "vessel": {"t1": (1600.0, 1800.0), "t2": (120.0, 200.0), "pd": (0.80, 0.85)},
    },
}
# Relaxation times move together between subjects (temperature, calibration, age act on
# all tissues): one quantile per subject, jittered per tissue, keeps textbook orderings.
RELAXATION_JITTER = 0.15
GADOLINIUM_R1_PER_MM_MS = {1.5: 4.3e-3, 3.0: 3.7e-3}  # r1 in /(mM ms)
ENHANCING_T1_POST_MS = {1.5: (400.0, 650.0), 3.0: (450.0, 700.0)}
VESSEL_T1_POST_MS = {1.5: (250.0, 400.0), 3.0: (300.0, 450.0)}

# Sequence parameter ranges (ms, degrees), drawn per subject.
T1_WEIGHTING_KINDS = ("spin_echo", "mprage")
MPRAGE_SHARE = 0.7  # share of subjects whose T1 is a 3D gradient echo (MPRAGE-like)
# Post-contrast T1 is more often 3D (consensus glioma protocols recommend a 3D T1 after
# gadolinium); drawn on its own, so pre- and post-contrast can differ as in BraTS.
MPRAGE_SHARE_POST_CONTRAST = 0.85
PROTOCOLS = {
    "spin_echo_t1": {1.5: {"tr": (450.0, 600.0), "te": (9.0, 15.0)},
                     3.0: {"tr": (500.0, 700.0), "te": (8.0, 12.0)}},
    "mprage": {1.5: {"tr": (1900.0, 2200.0), "ti": (1000.0, 1100.0), "flip": (12.0, 15.0),
                     "echo_spacing": (8.0, 10.0), "readouts": (160, 176), "te": (3.0, 4.5)},
               3.0: {"tr": (2000.0, 2300.0), "ti": (900.0, 1100.0), "flip": (8.0, 9.0),
                     "echo_spacing": (6.5, 7.5), "readouts": (176, 192), "te": (2.5, 3.5)}},
    "t2": {1.5: {"tr": (3500.0, 5500.0), "te": (105.0, 130.0)},
           3.0: {"tr": (4000.0, 6000.0), "te": (100.0, 125.0)}},
    "flair": {1.5: {"tr": (8000.0, 10000.0), "te": (90.0, 120.0)},
              3.0: {"tr": (9000.0, 11000.0), "te": (85.0, 115.0)}},
}
# FLAIR's TI nulls CSF of the protocol's nominal T1 at the chosen TR; scanners do this
# with a nominal CSF T1 that is slightly off the subject's, so CSF is nulled imperfectly.
FLAIR_NOMINAL_CSF_T1_MS = (3800.0, 4600.0)


# ---------------------------------------------------------------------------------------
# Signal equations (magnitude images)


def spin_echo_signal(pd, t1, t2, tr, te):
    """S = PD (1 - exp(-TR/T1)) exp(-TE/T2)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery_signal(pd, t1, t2, tr, te, ti):
    """S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def flair_null_ti(t1_csf_ms: float, tr_ms: float) -> float:
    """TI that nulls a tissue of T1 `t1_csf_ms` at repetition time TR:
    TI = T1 ln(2 / (1 + exp(-TR/T1))) (-> T1 ln 2 for TR >> T1)."""
    return t1_csf_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_csf_ms)))


def t1_after_contrast(t1_pre_ms, concentration_mm, r1):
    """1/T1_post = 1/T1_pre + r1 C."""
    return 1.0 / (1.0 / t1_pre_ms + r1 * concentration_mm)


def mprage_longitudinal(t1_ms: np.ndarray, tr: float, ti: float, flip_deg: float, echo_spacing: float,
                        readouts: int, cycles: int = 8) -> np.ndarray:
    """Magnitude of the longitudinal magnetisation (M0 = 1) at the centre of k-space of an
    MPRAGE in steady state, for an array of T1 values.

    One cycle: perfect inversion, free recovery until the readout train starts, `readouts`
    small-angle pulses `echo_spacing` apart (k-space centre in the middle of the train,
    linear ordering), free recovery until the next inversion (TR = inversion to
    inversion). Iterated until the magnetisation repeats itself (a few cycles)."""
    t1 = np.asarray(t1_ms, dtype=np.float64)
    cos_a = math.cos(math.radians(flip_deg))
    before_train = max(ti - 0.5 * readouts * echo_spacing, 1.0)
    after_train = max(tr - before_train - readouts * echo_spacing, 1.0)
    e_before, e_step, e_after = (np.exp(-t / t1) for t in (before_train, echo_spacing, after_train))
    mz = np.ones_like(t1)
    centre = np.zeros_like(t1)
    for _ in range(cycles):
        mz = 1.0 - (1.0 + mz) * e_before  # inversion then recovery: 1 - (1 - (-mz)) e
        for k in range(readouts):
            if k == readouts // 2:
                centre = mz.copy()
            mz = 1.0 - (1.0 - mz * cos_a) * e_step
        mz = 1.0 - (1.0 - mz) * e_after
    return np.abs(centre)


class MprageLookup:
    """S(T1) of one MPRAGE protocol, tabulated on a log grid (the train is simulated once
    per subject, then every voxel is a 1-D interpolation)."""

    GRID = np.exp(np.linspace(math.log(100.0), math.log(8000.0), 384))

    def __init__(self, protocol: dict):
        self.flip = protocol["flip"]
        self.te = protocol["te"]
        self.table = mprage_longitudinal(self.GRID, protocol["tr"], protocol["ti"], protocol["flip"],
                                         protocol["echo_spacing"], int(protocol["readouts"]))

    def __call__(self, pd, t1, t2):
        longitudinal = np.interp(np.log(np.clip(t1, self.GRID[0], self.GRID[-1])), np.log(self.GRID), self.table)
        return pd * longitudinal * math.sin(math.radians(self.flip)) * np.exp(-self.te / t2)


# ---------------------------------------------------------------------------------------
# Per-subject draws


def _uniform(rng: np.random.Generator, low_high) -> float:
    low, high = low_high
    return float(rng.uniform(low, high))


def draw_tissue_properties(rng: np.random.Generator, field: float) -> dict[str, dict[str, float]]:
    """Per-subject T1, T2 (ms), PD per tissue at `field` tesla, plus the gadolinium
    concentration (mM) of the enhancing tissues and their post-contrast T1."""
    table = TISSUE_PROPERTIES[field]
    shared = {"t1": rng.random(), "t2": rng.random(), "pd": rng.random()}
    props = {}
    for tissue, ranges in table.items():
        props[tissue] = {}
        for key in ("t1", "t2", "pd"):
            low, high = ranges[key]
            quantile = float(np.clip(shared[key] + rng.uniform(-RELAXATION_JITTER, RELAXATION_JITTER), 0.0, 1.0))
            props[tissue][key] = low + quantile * (high - low)
    r1 = GADOLINIUM_R1_PER_MM_MS[field]
    for tissue, targets in (("enhancing", ENHANCING_T1_POST_MS[field]), ("vessel", VESSEL_T1_POST_MS[field])):
        t1_post = _uniform(rng, targets)
        props[tissue]["gd_mM"] = (1.0 / t1_post - 1.0 / props[tissue]["t1"]) / r1
        props[tissue]["t1_post"] = t1_post
    return props


def _t1_weighted_protocol(rng: np.random.Generator, field: float, mprage_share: float) -> dict:
    kind = "mprage" if rng.random() < mprage_share else "spin_echo"
    ranges = PROTOCOLS["mprage" if kind == "mprage" else "spin_echo_t1"][field]
    protocol = {"kind": kind, **{k: _uniform(rng, v) for k, v in ranges.items()}}
    if kind == "mprage":
        protocol["readouts"] = int(round(protocol["readouts"]))
    return protocol


def draw_protocols(rng: np.random.Generator, field: float) -> dict[str, dict]:
    """Sequence and parameters of each modality for one subject."""
    t1_protocol = _t1_weighted_protocol(rng, field, MPRAGE_SHARE)
    flair = {"kind": "inversion_recovery", **{k: _uniform(rng, v) for k, v in PROTOCOLS["flair"][field].items()}}
    flair["ti"] = flair_null_ti(_uniform(rng, FLAIR_NOMINAL_CSF_T1_MS), flair["tr"])
    t2 = {"kind": "spin_echo", **{k: _uniform(rng, v) for k, v in PROTOCOLS["t2"][field].items()}}
    t1c_protocol = _t1_weighted_protocol(rng, field, MPRAGE_SHARE_POST_CONTRAST)
    return {"t1": {**t1_protocol, "contrast_agent": False},
            "t1ce": {**t1c_protocol, "contrast_agent": True},
            "t2": {**t2, "contrast_agent": False},
            "flair": {**flair, "contrast_agent": False}}


def signal_function(protocol: dict):
    """f(pd, t1, t2) -> magnitude signal for one protocol (numpy arrays or floats)."""
    if protocol["kind"] == "mprage":
        return MprageLookup(protocol)
    if protocol["kind"] == "spin_echo":
        return lambda pd, t1, t2: spin_echo_signal(pd, t1, t2, protocol["tr"], protocol["te"])
    return lambda pd, t1, t2: inversion_recovery_signal(pd, t1, t2, protocol["tr"], protocol["te"], protocol["ti"])


def tissue_t1(props: dict[str, float], protocol: dict) -> float:
    """Pre- or post-contrast T1 of one tissue under one protocol."""
    return props["t1_post"] if protocol["contrast_agent"] and "t1_post" in props else props["t1"]


def signal_table(properties: dict, protocols: dict) -> dict[str, dict[str, float]]:
    """{modality: {tissue: noise-free signal}} with every tissue at its subject mean."""
    table = {}
    for modality, protocol in protocols.items():
        f = signal_function(protocol)
        table[modality] = {t: float(f(p["pd"], tissue_t1(p, protocol), p["t2"])) for t, p in properties.items()}
    return table
