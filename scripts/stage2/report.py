"""Stage-2 report: pseudo-mask quality on the training split, stage 1 vs stage 2 on the test split.

    python -m scripts.stage2.report [--key value ...]
      = python -m monai.bundle run reporting --config_file "['configs/train.yaml','configs/stage2.yaml']" ...
      e.g. --ckpt_dir DIR --output_dir OUT --dataset_dir DATA --cache_dir CACHE

Rows (per volume, 3D, scripts.workflows.metrics's DSC / ASSD and empty-case rule):

- training split, against the ground truth, for reporting only (the segmentations are read
  here and nowhere in the stage-2 training): `pseudo_raw` (fused CMER map > threshold) and
  `pseudo_refined` (after the refinement switches; ignored pixels count as background),
  with the fraction of brain voxels the confidence filter ignored;
- test split: `stage1` (the CMER fused mask of every network, the map engine with the
  pseudo-masks' settings, as configs/evaluate.yaml computes it), `stage1_pseudo` (only when
  `pseudo_modalities` fuses a subset: the fused mask of those networks, what stage 2 learnt
  from) and `stage2` (the segmentation network's mask).

Writes `stage2_report.md` and `stage2_per_subject.csv` into the output folder and prints them.
"""

from __future__ import annotations

import ast
import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch

from scripts.common import MODALITIES, atomic_write_text
from scripts.data.subjects import load_datalist
from scripts.workflows.metrics import format_table, summarise_rows, volume_row
from scripts.stage2.inference import stage2_probability
from scripts.stage2.model import build_from_checkpoint
from scripts.stage2.pseudo_labels import IGNORE_LABEL, refine_labels

ROW_FIELDS = ("split", "subject", "map", "dsc", "assd", "tp", "fp", "fn", "empty_case", "ignored_fraction")
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("configs/train.yaml", "configs/stage2.yaml")
SWITCHES = "training_switches"  # rows of each refinement switch alone
SWITCH_NAMES = ("largest_component_volume", "largest_component_slice", "confidence_filter")


class Stage2Report:
    """Compute, write and print the stage-2 rows (module docstring).

    Args:
        datalist: the datalist JSON (train.yaml's `datalist`).
        volume_cache: the VolumeCache of the preprocessed volumes.
        labels: the PseudoLabels (its PseudoMaskCache holds the CMER model and engine settings).
        stage2_ckpt_path: the trained stage-2 model (stage2_model.pt).
        output_dir: where stage2_report.md and stage2_per_subject.csv go.
        device: where the networks run.
        stage2_threshold: stage-2 mask = tumour probability > this.
        slice_batch_size: slices per forward.
        test_split: the datalist section of the stage-1 / stage-2 comparison.
    """

    def __init__(self, datalist, volume_cache, labels, stage2_ckpt_path, output_dir, device="cpu",
                 stage2_threshold: float = 0.5, slice_batch_size: int = 32, test_split: str = "testing"):
        self.datalist, self.volume_cache, self.labels = datalist, volume_cache, labels
        self.stage2_ckpt_path, self.output_dir = str(stage2_ckpt_path), Path(output_dir)
        self.device = torch.device(device)
        self.stage2_threshold = float(stage2_threshold)
        self.slice_batch_size = int(slice_batch_size)
        self.test_split = test_split
        self.rows: list[dict] = []

    def _truth(self, volume: dict) -> np.ndarray:
        return volume["mask"][0].numpy() > 0

    def training_rows(self) -> list[dict]:
        """Pseudo-mask DSC / ASSD of the training split against the ground truth (reporting only)."""
        rows = []
        pseudo = self.labels.pseudo
        for record in load_datalist(self.datalist, "training"):
            volume = self.volume_cache.get(record)
            truth, spacing = self._truth(volume), volume["spacing"].tolist()
            fused = pseudo.fused(record)
            labels = self.labels.labels(record)
            brain = (volume["image"] != 0).any(dim=0).numpy()
            ignored = float((labels == self.labels.ignore_label)[brain].mean()) if brain.any() else 0.0
            for name, pred in (("pseudo_raw", fused > pseudo.threshold), ("pseudo_refined", labels == 1)):
                rows.append({"split": "training", **volume_row(volume["subject"], name, pred, truth, spacing),
                             "ignored_fraction": ignored if name == "pseudo_refined" else 0.0})
            rows += self.switch_rows(volume["subject"], fused, truth, brain, spacing)
        return rows

    def switch_rows(self, subject: str, fused: np.ndarray, truth: np.ndarray, brain: np.ndarray, spacing) -> list[dict]:
        """Each refinement switch on its own (the configured band): pseudo-mask DSC on the training
        split; for the confidence filter over the voxels it keeps (the ones the loss sees)."""
        band = {k: self.labels.refine[k] for k in ("ignore_low", "ignore_high") if k in self.labels.refine}
        rows = []
        for name, options in (("largest_component_volume", {"largest_component": True, "component_scope": "volume"}),
                              ("largest_component_slice", {"largest_component": True, "component_scope": "slice"}),
                              ("confidence_filter", {"confidence_filter": True, **band})):
            labels = refine_labels(fused, self.pseudo_threshold, **options)
            kept = labels != IGNORE_LABEL
            ignored = float((~kept)[brain].mean()) if brain.any() else 0.0
            rows.append({"split": SWITCHES, **volume_row(subject, name, (labels == 1) & kept, truth & kept, spacing),
                         "ignored_fraction": ignored})
        return rows

    def test_rows(self, stage2_net) -> list[dict]:
        """Stage-1 (CMER fused) and stage-2 masks of the test split against the ground truth."""
        rows = []
        pseudo = self.labels.pseudo
        channels = [MODALITIES.index(m) for m in stage2_net.modalities]
        for record in load_datalist(self.datalist, self.test_split):
            volume = self.volume_cache.get(record)
            truth, spacing = self._truth(volume), volume["spacing"].tolist()
            # stage 1 = the CMER fused mask of every network (the paper's), whatever the pseudo-masks fuse
            groups = [pseudo.modalities] + ([pseudo.fused_modalities] if self.subset_pseudo else [])
            fused = pseudo.compute_groups(record, groups)  # one engine pass for both stage-1 rows
            masks = [(name, f > pseudo.threshold) for name, f in zip(("stage1", "stage1_pseudo"), fused)]
            probability = stage2_probability(stage2_net, torch.as_tensor(volume["image"])[channels],
                                             self.slice_batch_size)
            masks.append(("stage2", probability.numpy() > self.stage2_threshold))
            for name, pred in masks:
                rows.append({"split": self.test_split, **volume_row(volume["subject"], name, pred, truth, spacing),
                             "ignored_fraction": 0.0})
        return rows

    def run(self) -> dict:
        """All rows, the summaries per (split, map), the files written; prints the tables."""
        stage2_net = build_from_checkpoint(self.stage2_ckpt_path, self.device)
        self.rows = self.training_rows() + self.test_rows(stage2_net)
        summary = {}
        for split, names in (("training", ("pseudo_raw", "pseudo_refined")), (SWITCHES, SWITCH_NAMES),
                             (self.test_split, self.test_maps)):
            summary[split] = {n: summarise_rows([r for r in self.rows if r["split"] == split and r["map"] == n],
                                                self.pseudo_threshold) for n in names}
        text = self.markdown(summary)
        atomic_write_text(self.output_dir / "stage2_report.md", text)
        atomic_write_text(self.output_dir / "stage2_per_subject.csv", self.csv_text())
        print(f"\n{text}\n-> {self.output_dir / 'stage2_report.md'}", flush=True)
        return {"rows": self.rows, "summary": summary}

    def _mean_ignored(self, name: str) -> float:
        values = [r["ignored_fraction"] for r in self.rows if r["split"] == SWITCHES and r["map"] == name]
        return float(np.mean(values)) if values else 0.0

    @property
    def subset_pseudo(self) -> bool:
        """The pseudo-masks fuse a subset of the networks (`pseudo_modalities`)."""
        pseudo = self.labels.pseudo
        return list(pseudo.fused_modalities) != list(pseudo.modalities)

    @property
    def test_maps(self) -> tuple[str, ...]:
        return ("stage1", "stage1_pseudo", "stage2") if self.subset_pseudo else ("stage1", "stage2")

    @property
    def pseudo_threshold(self) -> float:
        return self.labels.pseudo.threshold

    def per_volume_table(self) -> str:
        tests = [r for r in self.rows if r["split"] == self.test_split]
        subjects = list(dict.fromkeys(r["subject"] for r in tests))
        cell = {(r["subject"], r["map"]): r for r in tests}
        names = {"stage1": "stage 1", "stage1_pseudo": "stage 1 (pseudo-mask maps)", "stage2": "stage 2"}
        maps = self.test_maps
        lines = ["| subject | " + " | ".join(f"{names[m]} DSC (%)" for m in maps) + " | "
                 + " | ".join(f"{names[m]} ASSD (mm)" for m in maps) + " |", "|---" * (1 + 2 * len(maps)) + "|"]
        for subject in subjects:
            row = [cell[(subject, m)] for m in maps]
            lines.append(f"| {subject} | " + " | ".join(f"{100 * r['dsc']:.1f}" for r in row) + " | "
                         + " | ".join(_mm(r["assd"]) for r in row) + " |")
        return "\n".join(lines) + "\n"

    def markdown(self, summary: dict) -> str:
        ignored = [r["ignored_fraction"] for r in self.rows if r["map"] == "pseudo_refined"]
        refine = ", ".join(f"{k}={v}" for k, v in self.labels.refine.items()) or "none"
        return "\n".join([
            "# Stage 2: segmentation network trained on the CMER pseudo-masks", "",
            f"Stage-2 model {self.stage2_ckpt_path}; pseudo-masks from {self.labels.pseudo.ckpt_path} "
            f"(fused > {self.pseudo_threshold:g}, maps of {', '.join(self.labels.pseudo.fused_modalities)}); "
            f"refinement: {refine}.", "",
            "## Pseudo-masks of the training split against the ground truth (reporting only)", "",
            format_table(summary["training"]),
            f"Confidence filter: {100 * float(np.mean(ignored)) if ignored else 0.0:.1f} % of the brain voxels "
            "ignored on average.", "",
            "Each refinement switch on its own (training split; the confidence filter scored over the voxels it "
            f"keeps, {100 * self._mean_ignored('confidence_filter'):.1f} % of the brain voxels ignored):", "",
            format_table(summary[SWITCHES]),
            f"## Test split ({self.test_split}): stage 1 (CMER fused mask of every network) vs stage 2", "",
            format_table(summary[self.test_split]),
            "Per volume:", "", self.per_volume_table()])

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()


def _mm(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def main(argv=None) -> int:
    """`python -m scripts.stage2.report --key value ...`: the `reporting` run of the stage-2 config."""
    from monai.bundle.scripts import run

    args = list(sys.argv[1:] if argv is None else argv)
    overrides, index = {}, 0
    while index < len(args):
        key, _, value = args[index].lstrip("-").partition("=")
        if not _:
            index += 1
            value = args[index] if index < len(args) else ""
        try:  # values as `python -m monai.bundle run` (fire) reads them: Python literals, else strings
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
        index += 1
    overrides.setdefault("bundle_root", str(BUNDLE_ROOT))
    run(run_id="reporting", config_file=[str(BUNDLE_ROOT / f) for f in CONFIGS],
        meta_file=str(BUNDLE_ROOT / "configs/metadata.json"), logging_file=str(BUNDLE_ROOT / "configs/logging.conf"),
        **overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
