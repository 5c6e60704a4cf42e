"""The runs of `tools.experiments`: which method, modalities, overrides and seed each row of the paper needs.

The main rows of Table II (CAM, SEAM (scale), SEAM (all), CMER, stage 2 from both kinds of
pseudo-masks, full supervision) run for every seed; the Table III ablations, the Table I pair
runs, the Fig. 3 transform ablation, the DeepLab backbone (Table IV) and the improvement
switches and two controls (CAM on two views without ER, CMER with pi = identity) run for the first seed only. GradCAM++ (the paper's second block) and the Table I
pairs of the baselines are read-outs of the main runs' networks, evaluated inside those runs
(`EXTRA_READOUTS`, `Plan.pairs`), so they need no training of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from scripts.common import MODALITIES
from tools.experiment_report import ABLATIONS, BASELINES, DEEPLAB_RUN, TRANSFORM_KINDS, seed_key

PAIRS = (("t1", "t2"), ("t1c", "flair"), ("t1", "flair"), ("t1c", "t2"))
DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
# Set per seed by the runner (seed_overrides): --set may not change them.
SEEDED_KEYS = ("seed", "phantom#seed", "dataset_dir", "cache_dir", "datalist_path", "make_phantom")
# Read-outs evaluated on a run's own networks besides its CAMs, first seed: {run: methods}.
EXTRA_READOUTS = {name: ("gradcampp",) for name in BASELINES + ("cmer",)}


@dataclass(frozen=True)
class Run:
    """One training run of the plan: a method preset on some modalities, for one seed."""

    name: str
    method: str  # a file of configs/methods/
    modalities: tuple[str, ...] = MODALITIES
    overrides: tuple = ()  # (config id, value) pairs on top of the method preset
    seed: int = 0
    stage1: str = ""  # stage-2 runs only: the run of the same seed whose model.pt gives the pseudo-masks

    @property
    def key(self) -> str:
        """'seed<s>/<name>': the run's folder under runs/ and its name in the wall-time table."""
        return f"{seed_key(self.seed)}/{self.name}"


# Improvement switches measured against the default (docs/results.md).
SWITCH_RUNS = (
    Run("cmer+per_sample_sum", "cmer", overrides=(("objective#reduction", "per_sample_sum"),)),
    Run("cmer+mask_out_of_field", "cmer", overrides=(("objective#mask_out_of_field", True),)),
)
# Fig. 3: CMER with one kind of transform in its equivariance terms at a time.
TRANSFORM_RUNS = tuple(Run(f"cmer_{kind}", "cmer", overrides=(("transforms#kinds", [kind]),))
                       for kind in TRANSFORM_KINDS)
# Controls (issue 34): what equivariance adds beyond a second, transformed view (CAM with L_C on x and pi(x),
# no ER), and what cross-modality agreement gives without equivariance (CMER with pi = identity).
CONTROL_RUNS = (
    Run("cam_two_view", "cam", overrides=(("transforms#kinds", list(TRANSFORM_KINDS)),)),
    Run("cmer_identity", "cmer", overrides=(("transforms#kinds", ["identity"]),)),
)
# Stage 2 from the paper's pseudo-masks: all four maps fused (the `auto` default picks its own).
STAGE2_ALL = (("pseudo_modalities", None),)


@dataclass
class Plan:
    """The runs in order, the seeds, the pairs of Table I and what every run shares (presets, --set, data)."""

    runs: list[Run]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    pairs: tuple = PAIRS
    overrides: dict = field(default_factory=dict)  # --set, for every run
    presets: tuple[str, ...] = ()
    dataset_dir: str | None = None  # --dataset-dir: fixed data for every seed
    device: str | None = None  # --device
    readouts: dict = field(default_factory=lambda: dict(EXTRA_READOUTS))
    kind: str = "full"  # or "quick": recorded, so --report-only rebuilds the same plan
    extras: bool = True  # the first seed's pair / read-out evaluations and overlay (False: --main-only, a grid)


def full_plan(seeds=DEFAULT_SEEDS) -> Plan:
    """Every run of the paper's tables, ordered so an interrupted experiment has the most important first:
    per seed CMER, its two stage-2 runs (right after it: they need its model.pt) and the baselines;
    then full supervision for every seed (the last main row), the two controls (CONTROL_RUNS), the Table III ablations, the Fig. 3 transform runs, the
    pair runs, the DeepLab backbone and the switches (first seed)."""
    seeds = tuple(int(s) for s in seeds)
    first = seeds[0]
    runs = []
    for s in seeds:
        runs += [Run("cmer", "cmer", seed=s), Run("stage2", "cmer", seed=s, stage1="cmer"),
                 Run("stage2_all", "cmer", overrides=STAGE2_ALL, seed=s, stage1="cmer")]
        runs += [Run(m, m, seed=s) for m in ("cam", "seam_all", "seam_scale")]
    runs += [Run("full_supervision", "full_supervision", seed=s) for s in seeds]
    runs += [dataclasses.replace(r, seed=first) for r in CONTROL_RUNS]
    runs += [Run(m, m, seed=first) for m in ABLATIONS if m != "cmer"]
    runs += [dataclasses.replace(r, seed=first) for r in TRANSFORM_RUNS]
    runs += [Run(f"cmer_{a}_{b}", "cmer", (a, b), seed=first) for a, b in PAIRS]
    runs.append(Run(DEEPLAB_RUN, "cmer", overrides=(("backbone", "deeplab"),), seed=first))
    runs += [dataclasses.replace(r, seed=first) for r in SWITCH_RUNS]
    return Plan(runs, seeds=seeds)


def quick_plan(seeds=QUICK_SEEDS) -> Plan:
    """A few-minute plan on the small phantom: CAM, SEAM (all), CMER and stage 2 per seed, one pair run."""
    seeds = tuple(int(s) for s in seeds)
    stage2 = (("stage2_epochs", "@epochs"), ("stage2_base_channels", "@base_channels"))
    runs = [r for s in seeds for r in (Run("cam", "cam", seed=s), Run("seam_all", "seam_all", seed=s),
                                       Run("cmer", "cmer", seed=s),
                                       Run("stage2", "cmer", overrides=stage2, seed=s, stage1="cmer"))]
    runs.append(Run("cmer_t1_t2", "cmer", ("t1", "t2"), seed=seeds[0]))
    return Plan(runs, seeds=seeds, pairs=(("t1", "t2"),), presets=("configs/presets/phantom_quick.yaml",),
                readouts={"cmer": ("gradcampp",)}, kind="quick")


def seed_overrides(seed: int, out_dir: Path, dataset_dir: str | None = None) -> dict:
    """Config overrides of one seed: training seed (which seeds the split), data folder, cache, datalist.

    Without `dataset_dir` the phantom of seed s (`phantom#seed`) is generated into
    <out>/data/seed<s>; with it the data are shared and each seed writes its own split to
    <out>/splits/seed<s>/datalist.json (unless `dataset_dir` is itself a datalist .json).
    """
    out_dir = Path(out_dir)
    overrides = {"seed": int(seed), "cache_dir": str(out_dir / "cache" / seed_key(seed))}
    if dataset_dir is None:
        overrides.update({"dataset_dir": str(out_dir / "data" / seed_key(seed)), "make_phantom": True,
                          "phantom#seed": int(seed)})
        return overrides
    data = Path(dataset_dir).resolve()
    overrides["dataset_dir"] = str(data)
    if not (data.suffix.lower() == ".json" and data.is_file()):
        overrides["datalist_path"] = str(out_dir / "splits" / seed_key(seed) / "datalist.json")
    return overrides


def run_dir(out_dir: Path, run: Run) -> Path:
    """<out>/runs/seed<s>/<run name>."""
    return Path(out_dir) / "runs" / seed_key(run.seed) / run.name


def run_overrides(run: Run, plan: Plan, out_dir: Path, common: dict) -> dict:
    """Every override of a run but its output folders: common < --set < the seed's < the run's own."""
    return {**common, **plan.overrides, **seed_overrides(run.seed, out_dir, plan.dataset_dir), **dict(run.overrides)}


def selected(plan: Plan, only=None) -> list[Run]:
    """The plan's runs that `only` names (by name or seed<s>/name); all of them without `only`."""
    return [r for r in plan.runs if not only or r.name in only or r.key in only]
